//! A thread that waits for an fd to turn readable, and that another thread can stop by
//! writing to (or closing) a pipe: the stdio readers on both sides of the VM.

use std::os::fd::BorrowedFd;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

/// Why [`wait_readable`] returned.
#[derive(Debug, PartialEq, Eq)]
pub enum Woke {
    /// `fd` has bytes, or its end of file.
    Readable,
    /// `stop` was written to or closed: stop reading `fd`.
    Stopped,
}

/// Waits until `fd` is readable or `stop` is, retrying interrupted waits; `stop` wins.
pub fn wait_readable(fd: BorrowedFd<'_>, stop: BorrowedFd<'_>) -> nix::Result<Woke> {
    loop {
        let mut fds = [
            PollFd::new(fd, PollFlags::POLLIN),
            PollFd::new(stop, PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
        return Ok(match fds[1].any().unwrap_or(true) {
            true => Woke::Stopped,
            false => Woke::Readable,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;

    #[test]
    fn readable_wakes_and_stop_wins() {
        let (r, mut w) = std::io::pipe().unwrap();
        let (stop_r, mut stop_w) = std::io::pipe().unwrap();
        w.write_all(b"x").unwrap();
        assert_eq!(wait_readable(r.as_fd(), stop_r.as_fd()), Ok(Woke::Readable));
        stop_w.write_all(b"x").unwrap();
        assert_eq!(wait_readable(r.as_fd(), stop_r.as_fd()), Ok(Woke::Stopped));
        drop(stop_w);
        assert_eq!(wait_readable(r.as_fd(), stop_r.as_fd()), Ok(Woke::Stopped));
    }
}
