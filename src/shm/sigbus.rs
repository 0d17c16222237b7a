//! The SIGBUS guard of mapped shared-memory regions: a region whose object
//! its owner truncates after registration has pages with no file behind
//! them, and touching one raises SIGBUS, which would kill the server. The
//! handler installed here recognises faults inside a registered mapping,
//! replaces the faulting page with a private zero page (so the interrupted
//! read or write completes harmlessly) and marks the region faulted; the call
//! using it then fails and the region is unregistered. Faults anywhere else
//! go to the handler installed before (Rust's stack-overflow report) or the
//! default action, exactly as without this guard.
//!
//! Owns the `unsafe` of the handler (sigaction, the handler itself, the
//! replacement mmap); the table of mapped ranges it reads is lock-free
//! (atomics only), as a signal handler requires.

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::Once;

/// Most regions mapped at once, server-wide.
pub const MAX_SLOTS: usize = 1024;

/// A slot's `end` while its owner fills it in.
const RESERVED: usize = usize::MAX;

struct Slot {
    start: AtomicUsize,
    /// 0: free; RESERVED: being claimed; else one past the mapping's last byte.
    end: AtomicUsize,
    faulted: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const FREE: Slot = Slot {
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    faulted: AtomicBool::new(false),
};

static SLOTS: [Slot; MAX_SLOTS] = [FREE; MAX_SLOTS];
static PAGE_SIZE: AtomicUsize = AtomicUsize::new(4096);
static PREVIOUS: AtomicPtr<libc::sigaction> = AtomicPtr::new(std::ptr::null_mut());
static INSTALL: Once = Once::new();
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// The system's page size.
pub fn page_size() -> usize {
    install();
    PAGE_SIZE.load(Ordering::Relaxed)
}

/// Installs the handler once per process; false when it could not be (then
/// no region may be mapped).
pub fn install() -> bool {
    INSTALL.call_once(|| {
        #[allow(unsafe_code)]
        // SAFETY: sysconf has no preconditions; sigaction is given valid,
        // initialised structures; the previous action is leaked on purpose
        // (the handler reads it for the rest of the process' life).
        unsafe {
            let page = libc::sysconf(libc::_SC_PAGESIZE);
            if page > 0 {
                PAGE_SIZE.store(page as usize, Ordering::Relaxed);
            }
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigbus as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut action.sa_mask);
            let previous = Box::into_raw(Box::new(std::mem::zeroed::<libc::sigaction>()));
            if libc::sigaction(libc::SIGBUS, &action, previous) == 0 {
                PREVIOUS.store(previous, Ordering::Release);
                INSTALLED.store(true, Ordering::Release);
            } else {
                drop(Box::from_raw(previous));
            }
        }
    });
    INSTALLED.load(Ordering::Acquire)
}

/// A mapping watched by the handler while the value lives.
pub struct Watch {
    slot: usize,
}

impl Watch {
    /// Watches `len` bytes from `start` (page-aligned); None when every slot
    /// is taken.
    pub fn new(start: usize, len: usize) -> Option<Watch> {
        let slot = SLOTS.iter().position(|slot| {
            slot.end
                .compare_exchange(0, RESERVED, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        })?;
        let entry = &SLOTS[slot];
        entry.faulted.store(false, Ordering::Release);
        entry.start.store(start, Ordering::Release);
        entry
            .end
            .store(start.saturating_add(len), Ordering::Release);
        Some(Watch { slot })
    }

    /// True once a page of the mapping had to be replaced (its object was
    /// truncated under it): what was read from it since is zeros, what was
    /// written went nowhere.
    pub fn faulted(&self) -> bool {
        SLOTS[self.slot].faulted.load(Ordering::Acquire)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        // Freed before the mapping goes (the owner unmaps after this).
        SLOTS[self.slot].end.store(0, Ordering::Release);
    }
}

/// The SIGBUS handler: only atomics and mmap, both usable in a handler.
#[allow(unsafe_code)]
extern "C" fn on_sigbus(
    signal: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler.
    let address = unsafe { (*info).si_addr() } as usize;
    for slot in &SLOTS {
        let end = slot.end.load(Ordering::Acquire);
        if end == 0 || end == RESERVED {
            continue;
        }
        let start = slot.start.load(Ordering::Acquire);
        if address < start || address >= end {
            continue;
        }
        let page = PAGE_SIZE.load(Ordering::Relaxed);
        let base = address & !(page - 1);
        // SAFETY: [base, base + page) lies within a live mapping of this
        // process (the slot is freed before its mapping is unmapped, and a
        // mapping is only unmapped when no call uses it, so none is faulting
        // in it); MAP_FIXED replaces that page only.
        let replaced = unsafe {
            libc::mmap(
                base as *mut libc::c_void,
                page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        slot.faulted.store(true, Ordering::Release);
        if replaced != libc::MAP_FAILED {
            return;
        }
        break;
    }
    let previous = PREVIOUS.load(Ordering::Acquire);
    if !previous.is_null() {
        // SAFETY: set once by `install`, never freed.
        let previous = unsafe { &*previous };
        let handler = previous.sa_sigaction;
        if handler != libc::SIG_DFL && handler != libc::SIG_IGN {
            if previous.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: an SA_SIGINFO handler has this signature.
                let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(handler) };
                handler(signal, info, context);
            } else {
                // SAFETY: a plain handler has this signature.
                let handler: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(handler) };
                handler(signal);
            }
            return;
        }
    }
    // Not ours: the default action, which the fault raises again on return.
    // SAFETY: resetting a disposition is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGBUS, libc::SIG_DFL);
    }
}
