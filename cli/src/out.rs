//! Standard output for one command: collected, then written once, so that a reader closing the
//! pipe early (`peermem topo | head -1`) ends the command quietly instead of a panic in `println!`.

use std::io::Write;

pub struct Out {
    buf: String,
}

impl Out {
    pub fn new() -> Out {
        Out { buf: String::new() }
    }

    pub fn line(&mut self, s: &str) {
        self.buf.push_str(s);
        self.buf.push('\n');
    }

    pub fn text(&mut self, s: &str) {
        self.buf.push_str(s);
    }

    /// Writes what was collected; a closed pipe (EPIPE) is not an error.
    pub fn flush(&mut self) {
        let mut so = std::io::stdout().lock();
        match so.write_all(self.buf.as_bytes()).and_then(|()| so.flush()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
            Err(e) => eprintln!("peermem: writing standard output: {e}"),
        }
        self.buf.clear();
    }
}
