//! Tokens from files: how every binary takes a secret on a shared machine (a Slurm node, a
//! systemd credential, a Kubernetes Secret volume) without putting it on a command line, where
//! every user of the machine can read it in the process list.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("cannot read the token file {path}: {source}")]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the token file {path} is empty: put the token in it")]
    Empty { path: PathBuf },
    #[error(
        "the token file {path} can be read by every user of this machine (mode {mode:03o}): \
         `chmod o-rwx {path}` it, as anyone holding the token acts as its owner"
    )]
    Exposed { path: PathBuf, mode: u32 },
}

/// The token in `path` (surrounding whitespace removed). A file that every user may read is
/// refused; one its group may read is allowed, as Kubernetes mounts a Secret for a pod's group.
pub fn read(path: &Path) -> Result<String, TokenFileError> {
    let unreadable = |source| TokenFileError::Unreadable {
        path: path.to_owned(),
        source,
    };
    let mode = std::fs::metadata(path)
        .map_err(unreadable)?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o007 != 0 {
        return Err(TokenFileError::Exposed {
            path: path.to_owned(),
            mode,
        });
    }
    let token = std::fs::read_to_string(path).map_err(unreadable)?;
    let token = token.trim();
    if token.is_empty() {
        return Err(TokenFileError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(token.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &Path, text: &str, mode: u32) -> PathBuf {
        let path = dir.join(format!("token-{mode:o}"));
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn a_token_is_read_from_a_file_only_its_owner_and_group_can_read() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            read(&file(dir.path(), "s3cret\n", 0o600)).unwrap(),
            "s3cret"
        );
        assert_eq!(
            read(&file(dir.path(), " s3cret ", 0o440)).unwrap(),
            "s3cret"
        );
        let exposed = read(&file(dir.path(), "s3cret", 0o644)).unwrap_err();
        assert!(
            matches!(exposed, TokenFileError::Exposed { mode: 0o644, .. }),
            "{exposed}"
        );
        assert!(exposed.to_string().contains("chmod o-rwx"), "{exposed}");
        let empty = read(&file(dir.path(), "\n", 0o600)).unwrap_err();
        assert!(matches!(empty, TokenFileError::Empty { .. }), "{empty}");
        let missing = read(&dir.path().join("absent")).unwrap_err();
        assert!(missing.to_string().contains("absent"), "{missing}");
    }
}
