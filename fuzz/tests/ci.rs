//! Every fuzz target, run deterministically on stable Rust as CI runs it.
//!
//! Per target: each seed of `magnetar_fuzz::seeds`, each file of
//! `corpus/<target>/`, then `MUTANTS` mutants (round-robin over the seeds
//! and corpus files) and `RANDOM` random inputs, all from a xorshift
//! generator with a fixed seed per target, so that a run is the same on
//! every machine and a failure names an input that can be made again.
//!
//! Targets run on a thread with a fixed 2 MiB stack, whatever the
//! environment sets, so that a decoder that recursed with its input
//! overflows here rather than passing (a stack overflow aborts the test
//! binary; the thread is named after the target).
//! A failing input is printed and written under the target directory, to
//! be added to the corpus as a regression once fixed.

use std::fmt::Write as _;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use magnetar_fuzz::{seeds, TARGETS};

/// Mutants per target, whatever the number of seeds and corpus files.
const MUTANTS: usize = 2_000;
/// Purely random inputs per target.
const RANDOM: usize = 200;
const MAX_RANDOM_LEN: usize = 512;
/// Mutants never grow past this, however often a slice is duplicated.
const MAX_LEN: usize = 1 << 16;
/// The stack of the thread a target runs on.
const STACK: usize = 2 << 20;

/// Bytes a mutation writes: zero, all ones, and the edges of signed bytes.
const INTERESTING: [u8; 4] = [0x00, 0xFF, 0x7F, 0x80];
/// Lengths a mutation writes over any four bytes, big or little endian:
/// -1, the largest and smallest i32, one past 64 KiB, zero and one.
const LENGTHS: [u32; 6] = [0xFFFF_FFFF, 0x7FFF_FFFF, 0x8000_0000, 0x0001_0001, 0, 1];

/// xorshift64: tiny, and the same sequence on every platform.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        // xorshift stays at zero from zero.
        Rng(seed | 1)
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A number below `n` (0 when `n` is 0).
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }

    fn byte(&mut self) -> u8 {
        (self.next_u64() >> 24) as u8
    }
}

/// FNV-1a of the target's name: each target its own fixed sequence.
fn seed_of(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn insert(v: &mut Vec<u8>, at: usize, bytes: &[u8]) {
    let tail = v.split_off(at);
    v.extend_from_slice(bytes);
    v.extend_from_slice(&tail);
}

/// One to four mutations of `input`; `other` is spliced in by one of them.
fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        match rng.below(10) {
            // A bit flip.
            0 => {
                if !v.is_empty() {
                    let i = rng.below(v.len());
                    v[i] ^= 1 << rng.below(8);
                }
            }
            // An interesting byte.
            1 => {
                if !v.is_empty() {
                    let i = rng.below(v.len());
                    v[i] = INTERESTING[rng.below(INTERESTING.len())];
                }
            }
            // A random byte.
            2 => {
                if !v.is_empty() {
                    let i = rng.below(v.len());
                    v[i] = rng.byte();
                }
            }
            // A small step up or down.
            3 => {
                if !v.is_empty() {
                    let i = rng.below(v.len());
                    let step = rng.below(16) as u8;
                    v[i] = v[i].wrapping_add(step).wrapping_sub(8);
                }
            }
            // Truncation.
            4 => {
                let n = rng.below(v.len() + 1);
                v.truncate(n);
            }
            // A slice duplicated elsewhere.
            5 => {
                if !v.is_empty() {
                    let from = rng.below(v.len());
                    let to = from + 1 + rng.below(v.len() - from);
                    let slice = v[from..to].to_vec();
                    let at = rng.below(v.len() + 1);
                    insert(&mut v, at, &slice);
                }
            }
            // Random bytes inserted.
            6 => {
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.byte()).collect();
                let at = rng.below(v.len() + 1);
                insert(&mut v, at, &bytes);
            }
            // A range deleted.
            7 => {
                if !v.is_empty() {
                    let from = rng.below(v.len());
                    let to = (from + 1 + rng.below(16)).min(v.len());
                    let tail = v.split_off(to);
                    v.truncate(from);
                    v.extend_from_slice(&tail);
                }
            }
            // Spliced with another input: this one's head, the other's tail.
            8 => {
                if !other.is_empty() {
                    let cut = rng.below(v.len() + 1);
                    let from = rng.below(other.len());
                    v.truncate(cut);
                    v.extend_from_slice(&other[from..]);
                }
            }
            // A length overwritten with one that is huge, negative or zero.
            _ => {
                if v.len() >= 4 {
                    let at = rng.below(v.len() - 3);
                    let length = LENGTHS[rng.below(LENGTHS.len())];
                    let bytes = if rng.below(2) == 0 {
                        length.to_be_bytes()
                    } else {
                        length.to_le_bytes()
                    };
                    v[at..at + 4].copy_from_slice(&bytes);
                }
            }
        }
        v.truncate(MAX_LEN);
    }
    v
}

/// The files of `corpus/<name>/`, in name order (read_dir's order is not
/// the same everywhere).
fn corpus(name: &str) -> Vec<(PathBuf, Vec<u8>)> {
    // Where the crate is now, not where a shared target directory's
    // binary was built.
    let dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())
        .join("corpus")
        .join(name);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.file_name().is_some_and(|n| n != ".gitkeep"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .filter_map(|p| std::fs::read(&p).ok().map(|bytes| (p, bytes)))
        .collect()
}

fn hex(input: &[u8]) -> String {
    let mut s = String::with_capacity(input.len().min(256) * 2 + 3);
    for b in input.iter().take(256) {
        let _ = write!(s, "{b:02x}");
    }
    if input.len() > 256 {
        s.push_str("...");
    }
    s
}

/// Runs one input; on a panic, says which input it was, keeps it as a
/// file, and fails.
fn one(name: &str, target: fn(&[u8]), input: &[u8], origin: &str) {
    if let Err(e) = panic::catch_unwind(AssertUnwindSafe(|| target(input))) {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures");
        let file = dir.join(format!("{name}-{}", origin.replace([' ', '/'], "-")));
        let kept = std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::write(&file, input))
            .map_or_else(
                |e| format!("could not be kept: {e}"),
                |()| format!("kept as {}", file.display()),
            );
        eprintln!(
            "{name}: {origin} ({} bytes) failed; {kept}\n{}",
            input.len(),
            hex(input)
        );
        panic::resume_unwind(e);
    }
}

#[derive(Default)]
struct Counts {
    seeds: usize,
    corpus: usize,
    mutants: usize,
    random: usize,
}

fn exercise(name: &str, target: fn(&[u8])) -> Counts {
    let seeds = seeds(name);
    assert!(!seeds.is_empty(), "{name} has no seeds");
    let corpus = corpus(name);
    let mut counts = Counts::default();
    for (i, s) in seeds.iter().enumerate() {
        one(name, target, s, &format!("seed {i}"));
        counts.seeds += 1;
    }
    for (path, bytes) in &corpus {
        let file = path.file_name().map(|n| n.to_string_lossy().into_owned());
        one(
            name,
            target,
            bytes,
            &format!("corpus file {}", file.unwrap_or_default()),
        );
        counts.corpus += 1;
    }
    let pool: Vec<&[u8]> = seeds
        .iter()
        .map(Vec::as_slice)
        .chain(corpus.iter().map(|(_, b)| b.as_slice()))
        .collect();
    let mut rng = Rng::new(seed_of(name));
    for k in 0..MUTANTS {
        let input = pool[k % pool.len()];
        let other = pool[rng.below(pool.len())];
        let m = mutate(&mut rng, input, other);
        one(name, target, &m, &format!("mutant {k}"));
        counts.mutants += 1;
    }
    for k in 0..RANDOM {
        let len = rng.below(MAX_RANDOM_LEN + 1);
        let input: Vec<u8> = (0..len).map(|_| rng.byte()).collect();
        one(name, target, &input, &format!("random input {k}"));
        counts.random += 1;
    }
    counts
}

fn run(name: &'static str) {
    let target = TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, f)| *f)
        .unwrap_or_else(|| panic!("no fuzz target named {name}"));
    let worker = std::thread::Builder::new()
        .name(format!("fuzz-{name}"))
        .stack_size(STACK)
        .spawn(move || exercise(name, target))
        .expect("spawn a fuzz thread");
    match worker.join() {
        Ok(c) => println!(
            "{name}: {} inputs ({} seeds, {} corpus files, {} mutants, {} random)",
            c.seeds + c.corpus + c.mutants + c.random,
            c.seeds,
            c.corpus,
            c.mutants,
            c.random
        ),
        Err(e) => panic::resume_unwind(e),
    }
}

macro_rules! fuzz_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                run(stringify!($name));
            }
        )*

        /// A target added to the library without a test here would never
        /// run in CI.
        #[test]
        fn every_target_has_a_test() {
            let mut tested = [$(stringify!($name)),*];
            let mut targets: Vec<&str> = TARGETS.iter().map(|(n, _)| *n).collect();
            tested.sort_unstable();
            targets.sort_unstable();
            assert_eq!(tested.as_slice(), targets.as_slice());
        }
    };
}

fuzz_tests!(
    kafka_request,
    record_batch,
    amqp_frame,
    amqp_field_table,
    mqtt_packet,
    ws_frames,
    tier_file,
    journal_replay,
    bookie_proto,
    metadata_proto,
    geo_proto,
);
