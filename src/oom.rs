//! Out-of-memory from libtorch arrives as a Rust panic (tch turns the C++ exception into one).
//! The step engine catches it to retry with more micro-steps or to say which options help; a
//! panic hook would still print a trace and dozens of C++ frames first, and under MPI the
//! abort-on-panic hook would end the whole job before the catch. So an OOM panic inside
//! [`catch`] is marked, and every hook of ours stays silent for it.

use std::cell::Cell;
use std::panic::{self, PanicHookInfo};

thread_local! {
    /// Inside [`catch`] on this thread.
    static CATCHING: Cell<bool> = const { Cell::new(false) };
}

/// libtorch's out-of-memory messages (CUDA caching allocator, CPU allocator).
pub fn is_oom_message(msg: &str) -> bool {
    let m = msg.to_ascii_lowercase();
    m.contains("out of memory")
        || m.contains("can't allocate memory")
        || m.contains("not enough memory")
}

fn payload_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

/// Whether a panic being reported is an out-of-memory that [`catch`] will turn into an error
/// (hooks return early for it).
pub fn is_caught(info: &PanicHookInfo<'_>) -> bool {
    CATCHING.with(Cell::get) && is_oom_message(&payload_text(info.payload()))
}

/// Runs `f`, turning an out-of-memory failure of libtorch into `Err(first line of its
/// message)`. Any other panic continues unwinding.
pub fn catch<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    let outer = CATCHING.with(|c| c.replace(true));
    let result = panic::catch_unwind(panic::AssertUnwindSafe(f));
    CATCHING.with(|c| c.set(outer));
    match result {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload_text(payload.as_ref());
            if is_oom_message(&msg) {
                Err(msg.lines().next().unwrap_or("out of memory").to_owned())
            } else {
                panic::resume_unwind(payload)
            }
        }
    }
}

/// Wraps the current panic hook so that caught out-of-memory panics print nothing.
pub fn install_quiet_hook() {
    let previous = panic::take_hook();
    panic::set_hook(Box::new(move |info| {
        if !is_caught(info) {
            previous(info);
        }
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_oom_panic_becomes_an_error_and_other_panics_unwind() {
        let r: Result<(), String> =
            catch(|| panic!("CUDA out of memory. Tried to allocate 2 GiB\nmore"));
        assert_eq!(
            r.unwrap_err(),
            "CUDA out of memory. Tried to allocate 2 GiB"
        );
        let other = panic::catch_unwind(|| catch(|| -> Result<(), String> { panic!("a bug") }));
        assert!(other.is_err());
        assert!(
            !CATCHING.with(Cell::get),
            "the mark is cleared after a catch"
        );
    }
}
