//! The threads that write and sync files (the spool's writer, the local sink's writer),
//! started so that they do not take the CPU from the request work that feeds them.
//!
//! Such a thread spends most of its time in `fdatasync`, waiting for the disk. Each time
//! the disk answers, Linux wakes it, and a thread of the default policy woken after
//! sleeping preempts whatever runs on its CPU: the runtime's worker, in the middle of a
//! request, twice or three times per sync (the data, then the inode), each a context
//! switch away and back, and on a VM a reschedule interrupt from the CPU the disk's
//! interrupt landed on. Under `SCHED_BATCH` the woken writer waits for its turn instead
//! (the worker finishes what it is doing, or its slice ends), with the same share of the
//! CPU as before: nothing starves, a group's sync ends a little later, and the next group
//! is larger. Measured with the HTTP path on one CPU (BENCHMARKS.md, "The writers under
//! `SCHED_BATCH`").

use std::thread::JoinHandle;

/// Starts thread `name` running `work` under `SCHED_BATCH` (on Linux; elsewhere, and where
/// the policy cannot be set, under the default policy: the thread works the same, only
/// less politely).
pub fn spawn<F, T>(name: &str, work: F) -> std::io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            if let Err(error) = batch_policy() {
                tracing::debug!(%error, "this writer thread keeps the default scheduling policy");
            }
            work()
        })
}

/// Puts the calling thread under `SCHED_BATCH`. A direct `libc` call: rustix has no
/// binding for `sched_setscheduler`, and the `thread-priority` crate, which has one,
/// also resets the thread's nice value from a priority of its own mapping.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn batch_policy() -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: the call reads `param` while it runs and keeps no pointer to it; pid 0 is
    // the calling thread. Moving to SCHED_BATCH needs no privilege.
    match unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

#[cfg(not(target_os = "linux"))]
fn batch_policy() -> std::io::Result<()> {
    Ok(())
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #[test]
    #[allow(unsafe_code)]
    fn a_writer_thread_runs_under_sched_batch() {
        // SAFETY: sched_getscheduler takes a pid and reads nothing through pointers.
        let own = || unsafe { libc::sched_getscheduler(0) };
        let before = own();
        let policy = super::spawn("test-writer", own)
            .expect("a thread")
            .join()
            .expect("it ran");
        assert_eq!(policy, libc::SCHED_BATCH);
        // The policy is the writer's alone: the thread that started it keeps its own.
        assert_eq!(own(), before);
    }
}
