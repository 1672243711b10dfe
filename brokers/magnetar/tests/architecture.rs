//! Rules of the code's shape that a reviewer would otherwise check by
//! hand: the server links no client library (the load generators are
//! `magnetar-perf`'s), and no source file outgrows what one can read.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The longest a source file of ours may be.
const MAX_LINES: usize = 1_500;

fn root() -> PathBuf {
    magnetar_testkit::crate_dir(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the workspace root")
}

#[test]
fn the_server_binary_links_no_client_library() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(root())
        .args([
            "tree",
            "-p",
            "magnetar",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--offline",
            "--locked",
        ])
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(tree.lines().any(|l| l.starts_with("magnetar-broker ")));
    for client in ["rdkafka", "rdkafka-sys", "lapin", "rumqttc"] {
        let found: Vec<&str> = tree
            .lines()
            .filter(|l| l.split(' ').next() == Some(client))
            .collect();
        assert!(found.is_empty(), "the server links {found:?}");
    }
}

/// Source files under `dir`, but for third-party code, build output and
/// data.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let name = e.file_name();
        let name = name.to_string_lossy();
        if path.is_dir() {
            let skipped = name.starts_with('.')
                || [
                    "target",
                    "third_party",
                    "node_modules",
                    "artifacts",
                    "corpus",
                ]
                .contains(&name.as_ref());
            if !skipped {
                sources(&path, out);
            }
        } else if [".rs", ".py", ".sh"].iter().any(|x| name.ends_with(x)) {
            out.push(path);
        }
    }
}

#[test]
fn no_source_file_is_over_1500_lines() {
    let root = root();
    let mut files = Vec::new();
    sources(&root, &mut files);
    assert!(files.len() > 100, "found only {} files", files.len());
    let long: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let lines = std::fs::read_to_string(f).ok()?.lines().count();
            (lines > MAX_LINES).then(|| format!("{} ({lines})", f.display()))
        })
        .collect();
    assert!(long.is_empty(), "over {MAX_LINES} lines: {long:?}");
}
