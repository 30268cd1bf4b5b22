//! Replays the committed corpus (`fuzz/corpus/<target>/`: seeds from the fixtures and every input
//! AFL++ found interesting or that once crashed a parser) through each harness. A panic fails the
//! test and names the input.

use std::path::Path;

#[test]
fn every_corpus_input_runs_through_its_harness() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (name, f) in peermem_fuzz::TARGETS {
        let dir = root.join(name);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "{}: empty corpus", dir.display());
        for p in files {
            let data = std::fs::read(&p).unwrap();
            if std::panic::catch_unwind(|| f(&data)).is_err() {
                panic!("{name}: input {} panicked", p.display());
            }
        }
    }
}
