//! Resident memory of this process, from the kernel: current (VmRSS) and peak (VmHWM) bytes.
//! The peak can be reset to the current value by writing 5 to /proc/self/clear_refs, which
//! turns the kernel's high-water mark into a per-phase peak.

use std::fs;

/// (current, peak) resident bytes, or None where /proc is not available.
pub fn rss_bytes() -> Option<(u64, u64)> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    Some((kb_field(&status, "VmRSS:")?, kb_field(&status, "VmHWM:")?))
}

/// The bytes of a `Name:   123 kB` line of a /proc file.
fn kb_field(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(name))?;
    let kb: u64 = line[name.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Resets the peak to the current resident size; false where the kernel does not allow it.
pub fn reset_peak() -> bool {
    fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// MemAvailable from /proc/meminfo: what the kernel estimates can be allocated without
/// swapping.
pub fn mem_available() -> Option<u64> {
    kb_field(&fs::read_to_string("/proc/meminfo").ok()?, "MemAvailable:")
}

/// Tests that reset the process-wide peak take this lock, so they do not reset each other's.
#[cfg(test)]
pub(crate) static PEAK_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_sees_a_transient_allocation_and_resets() {
        let _peak = PEAK_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let (Some((_, _)), true) = (rss_bytes(), reset_peak()) else {
            return; // no /proc here: nothing to measure
        };
        let (before, _) = rss_bytes().unwrap();
        {
            let big = vec![1u8; 64 << 20]; // touched, so resident
            std::hint::black_box(&big);
        }
        let (_, peak) = rss_bytes().unwrap();
        assert!(
            peak >= before + (60 << 20),
            "peak {peak} should include the 64 MiB buffer (start {before})"
        );
        assert!(reset_peak());
        let (now, peak) = rss_bytes().unwrap();
        assert!(
            peak < now + (32 << 20),
            "after reset the peak ({peak}) is near the current size ({now})"
        );
    }
}
