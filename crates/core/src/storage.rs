//! A full data dir, told apart from other storage trouble: every layer that writes maps
//! ENOSPC and EDQUOT (and SQLite's SQLITE_FULL, which is how SQLite reports them) to
//! its own `StorageFull` variant, which the APIs answer with 507 `insufficient_storage`.

/// Whether an I/O error means the disk (or the user's quota) is full.
pub fn io_is_full(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

/// What callers are told when a write is refused for want of space.
pub const FULL_MESSAGE: &str =
    "the data dir is full: writes are refused until space is freed (sync invokes still run)";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enospc_and_edquot_are_full_other_errors_are_not() {
        assert!(io_is_full(&std::io::Error::from_raw_os_error(28)));
        assert!(io_is_full(&std::io::Error::from_raw_os_error(122)));
        assert!(!io_is_full(&std::io::Error::from_raw_os_error(5)));
        assert!(!io_is_full(&std::io::Error::other("x")));
    }
}
