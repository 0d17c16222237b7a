//! The process's limit on open file descriptors. Every client connection is a
//! descriptor; the usual soft limit (1024) is far below what a server that
//! hundreds of pipeline workers connect to needs, while the hard limit is
//! usually much higher. At start the server raises its soft limit to the hard
//! one (what an unprivileged process may do), so the limit an operator set is
//! the one in force. What happens when it is reached anyway is the accept
//! loop's business (`transport::incoming`).
#![allow(unsafe_code)]

/// The soft limit after raising it to the hard one, or why it stayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimit {
    pub soft: u64,
    pub hard: u64,
}

/// Raises the soft limit on open descriptors to the hard limit; returns the
/// limits now in force (None where they cannot be read).
pub fn raise_to_hard_limit() -> Option<FdLimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we own and pass by
    // a valid pointer; it reads nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads one rlimit from a valid pointer; raising
        // the soft limit up to the hard one is always permitted, and a
        // refusal leaves the old limit (checked by reading it back).
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit.rlim_cur = limit.rlim_max;
        }
    }
    Some(FdLimit {
        soft: limit.rlim_cur,
        hard: limit.rlim_max,
    })
}
