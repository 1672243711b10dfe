//! Writes every target's built seeds to `<dir>/<target>/seed-<n>`, so that
//! a long cargo-fuzz run starts from them as well as from `fuzz/corpus/`.
//!
//! `cargo run -p magnetar-fuzz --example write_seeds -- <dir>`

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "fuzz-seeds".into()),
    );
    for (name, _) in magnetar_fuzz::TARGETS {
        let out = dir.join(name);
        std::fs::create_dir_all(&out)?;
        let seeds = magnetar_fuzz::seeds(name);
        for (i, s) in seeds.iter().enumerate() {
            std::fs::write(out.join(format!("seed-{i}")), s)?;
        }
        println!("{name}: {} seeds in {}", seeds.len(), out.display());
    }
    Ok(())
}
