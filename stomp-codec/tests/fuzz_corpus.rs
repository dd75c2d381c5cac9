//! Runs the fuzz target's body over the committed seed corpus and over every input the fuzzer
//! ever found to crash (`fuzz/regressions/`), so ordinary test runs keep both green.

// Test code: a panic is the test failing, with its message.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::Path;

fn run_dir(dir: &Path) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let mut n = 0;
    for entry in entries {
        let path = entry.unwrap().path();
        if path.is_file() && path.file_name().is_some_and(|f| f != ".gitkeep") {
            let data = fs::read(&path).unwrap();
            stomp_codec::fuzz_decode(&data);
            n += 1;
        }
    }
    n
}

#[test]
fn the_fuzz_body_holds_on_the_seed_corpus_and_past_crashes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let seeds = run_dir(&root.join("corpus/decode"));
    assert!(seeds >= 10, "only {seeds} seed inputs found");
    run_dir(&root.join("regressions"));
}
