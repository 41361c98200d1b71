//! Reading a small file whose path someone else chose (a spec's dataset manifest, a
//! checkpoint's manifest in a shared directory): it must be a regular file, so that a FIFO
//! does not block the reader nor a device flood it, and it is read to a bound, never to its end.

use std::fs::File;
use std::io::Read;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum SmallFileError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("not a regular file")]
    NotRegular,
    #[error("larger than {max} bytes")]
    TooLarge { max: u64 },
}

/// The bytes of the regular file at `path`, if it holds at most `max` of them.
pub fn read_small_file(path: &Path, max: u64) -> Result<Vec<u8>, SmallFileError> {
    if !std::fs::metadata(path)?.is_file() {
        return Err(SmallFileError::NotRegular);
    }
    let mut bytes = Vec::new();
    File::open(path)?.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(SmallFileError::TooLarge { max });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_a_device_and_a_large_file_are_refused_without_reading_them_whole() {
        let dir = tempfile::tempdir().unwrap();
        let small = dir.path().join("small");
        std::fs::write(&small, b"12345").unwrap();
        assert_eq!(read_small_file(&small, 5).unwrap(), b"12345");
        assert!(matches!(
            read_small_file(&small, 4),
            Err(SmallFileError::TooLarge { max: 4 })
        ));
        assert!(matches!(
            read_small_file(Path::new("/dev/zero"), 1 << 20),
            Err(SmallFileError::NotRegular)
        ));
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        assert!(matches!(
            read_small_file(&fifo, 10),
            Err(SmallFileError::NotRegular)
        ));
        assert!(matches!(
            read_small_file(&dir.path().join("missing"), 10),
            Err(SmallFileError::Io(_))
        ));
    }
}
