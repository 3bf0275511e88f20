//! Reading files that must be regular files. Opening a FIFO blocks until a writer appears, and
//! a character device such as /dev/zero never ends: a dataset list, an image or a config that
//! is one of those would hang the run with no message. They are refused from their metadata
//! (which never blocks) before anything opens them.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

/// What a path is, when it is not a regular file ("a FIFO", "a folder", ...); None for a file.
pub fn not_regular(path: &Path) -> io::Result<Option<&'static str>> {
    let t = std::fs::metadata(path)?.file_type();
    Ok(if t.is_file() {
        None
    } else if t.is_dir() {
        Some("a folder")
    } else if t.is_fifo() {
        Some("a FIFO (named pipe)")
    } else if t.is_socket() {
        Some("a socket")
    } else if t.is_char_device() {
        Some("a character device")
    } else if t.is_block_device() {
        Some("a block device")
    } else {
        Some("not a regular file")
    })
}

fn refuse(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("it is {what}, not a regular file"),
    )
}

/// `std::fs::read`, refusing anything but a regular file (after following symlinks).
pub fn read(path: &Path) -> io::Result<Vec<u8>> {
    if let Some(what) = not_regular(path)? {
        return Err(refuse(what));
    }
    std::fs::read(path)
}

/// `std::fs::read_to_string`, refusing anything but a regular file.
pub fn read_to_string(path: &Path) -> io::Result<String> {
    if let Some(what) = not_regular(path)? {
        return Err(refuse(what));
    }
    std::fs::read_to_string(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifos_folders_and_devices_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        for (path, what) in [
            (fifo.as_path(), "FIFO"),
            (dir.path(), "folder"),
            (Path::new("/dev/null"), "character device"),
        ] {
            let err = read(path).unwrap_err().to_string();
            assert!(err.contains(what), "{}: {err}", path.display());
        }
        let file = dir.path().join("f");
        std::fs::write(&file, b"ok").unwrap();
        assert_eq!(read(&file).unwrap(), b"ok");
    }
}
