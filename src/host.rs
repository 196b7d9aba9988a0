//! What this process says about itself in records other processes read (the writer lease, a
//! restore's in-progress marker): the host's name.

/// The host's name (the kernel's, else `$HOSTNAME`), or "unknown host".
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown host".into())
}
