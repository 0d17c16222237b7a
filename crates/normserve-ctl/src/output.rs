//! Standard output for the commands: buffered, and quiet once the reader has
//! gone (`normserve-ctl sessions list | head -1`). Rust ignores SIGPIPE, so a
//! closed pipe shows up as an EPIPE write error; like other Unix tools the
//! command then stops printing without a message, and its exit code still
//! says how the command went (a mismatching `compare` still exits 1).

use std::io::{self, BufWriter, ErrorKind, Stdout, Write};

/// Where a command prints its results.
pub struct Output {
    stdout: BufWriter<Stdout>,
    /// The reader closed the pipe: everything else is dropped.
    closed: bool,
}

impl Output {
    pub fn stdout() -> Self {
        Output {
            stdout: BufWriter::new(io::stdout()),
            closed: false,
        }
    }

    fn closed_on_broken_pipe<T>(&mut self, result: io::Result<T>, nothing: T) -> io::Result<T> {
        match result {
            Err(error) if error.kind() == ErrorKind::BrokenPipe => {
                self.closed = true;
                Ok(nothing)
            }
            other => other,
        }
    }
}

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.closed {
            return Ok(buf.len());
        }
        let result = self.stdout.write(buf);
        self.closed_on_broken_pipe(result, buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.closed {
            return Ok(());
        }
        let result = self.stdout.flush();
        self.closed_on_broken_pipe(result, ())
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        // Errors were reported by the explicit flush at the end of a command;
        // this one only covers an early return.
        let _ = self.flush();
    }
}
