//! The AFL++ driver: `peermem-fuzz TARGET` runs harness TARGET on each input AFL gives it
//! (persistent mode). `fuzz/run-all` builds it with `cargo afl build` and runs every target.

fn main() {
    let name = std::env::args().nth(1).unwrap_or_default();
    let Some(f) = peermem_fuzz::target(&name) else {
        let names: Vec<&str> = peermem_fuzz::TARGETS.iter().map(|(n, _)| *n).collect();
        eprintln!("usage: peermem-fuzz TARGET (one of {})", names.join(", "));
        std::process::exit(2);
    };
    // Without afl's panic hook: a panic that escapes the harness still aborts (a crash), but one
    // the parser catches itself is the harness's answer, as in `cargo test`.
    afl::fuzz_nohook!(|data: &[u8]| f(data));
}
