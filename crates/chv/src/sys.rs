//! The one syscall this crate makes directly: sending a signal to an
//! export daemon (std can only signal its own children, and the daemons
//! are not ours once they daemonize). All of the crate's `unsafe` is here.

/// `SIGTERM`.
pub(crate) const SIGTERM: i32 = libc::SIGTERM;
/// `SIGKILL`.
pub(crate) const SIGKILL: i32 = libc::SIGKILL;

/// Sends `sig` to process `pid` (a positive pid: never a process group).
pub(crate) fn kill(pid: u32, sig: i32) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(pid)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: kill(2) takes plain integers and touches no memory of ours;
    // `pid` is positive, so it names one process, never a group.
    let rc = unsafe { libc::kill(pid, sig) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
