//! Ctrl-C (SIGINT) and SIGTERM cancel a long operation through its
//! [`Control`](vmvol::format::Control) flag, so the library stops at its next
//! check and removes what it was writing. A second signal ends the process at
//! once. This is the CLI's only `unsafe` code.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, OnceLock};

/// The flag every cancellable operation of this process watches.
static CANCEL: OnceLock<Arc<AtomicBool>> = OnceLock::new();
/// The first signal received, 0 before any.
static RECEIVED: AtomicI32 = AtomicI32::new(0);
/// Whether the handlers are installed.
static INSTALLED: OnceLock<io::Result<()>> = OnceLock::new();

extern "C" fn on_signal(sig: libc::c_int) {
    // Only async-signal-safe work: atomic loads and stores, and _exit.
    if RECEIVED.swap(sig, Ordering::SeqCst) != 0 {
        // SAFETY: _exit is async-signal-safe; the user asked twice, so skip
        // the cleanup the first request is still waiting for.
        unsafe { libc::_exit(128 + sig) }
    }
    // OnceLock::get is an atomic load; the flag was set before installing.
    if let Some(flag) = CANCEL.get() {
        flag.store(true, Ordering::SeqCst);
    }
}

/// Install the handler for `sig`. A signal the parent ignored (`&` in a
/// script) is taken over too: cancelling cleanly beats being unkillable by it.
fn install(sig: libc::c_int) -> io::Result<()> {
    // SAFETY: an all-zero `sigaction` is a valid value (empty mask, no flags,
    // SIG_DFL) that is filled in below.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // Restart interrupted system calls: the library sees the flag, not EINTR.
    action.sa_flags = libc::SA_RESTART;
    // SAFETY: `action.sa_mask` is a valid sigset_t owned by this frame.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    // SAFETY: `action` is fully initialised and `on_signal` only does
    // async-signal-safe work; the old action is not needed.
    if unsafe { libc::sigaction(sig, &action, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The cancel flag, with SIGINT and SIGTERM handlers that set it installed
/// (once per process). Commands that do not call this keep the default
/// action: Ctrl-C ends them at once, as they leave nothing half-made.
pub fn cancel_on_interrupt() -> io::Result<Arc<AtomicBool>> {
    let flag = CANCEL.get_or_init(|| Arc::new(AtomicBool::new(false)));
    let installed = INSTALLED.get_or_init(|| {
        install(libc::SIGINT)?;
        install(libc::SIGTERM)
    });
    match installed {
        Ok(()) => Ok(flag.clone()),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("installing the Ctrl-C handler: {e}"),
        )),
    }
}

/// The signal that asked for cancellation, if one arrived.
pub fn received() -> Option<i32> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}
