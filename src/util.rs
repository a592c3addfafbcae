//! Small helpers shared across modules.
//!
//! Durable writes: a file is written to a temp name, fsynced, renamed over its target, and then
//! the directory holding it is fsynced too. Without that last step a rename can be lost on a
//! power cut even though the data blocks reached the disk, leaving the old file (or none) after
//! a "successful" save. Every temp + rename in memgen goes through [`persist`] or
//! [`rename_durable`].

use std::io::Write;
use std::path::Path;

/// The directory holding `path` ("." for a bare file name).
fn parent_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| Path::new("."))
}

/// fsync a directory, so renames and creations inside it survive a crash.
pub fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        let d = std::fs::File::open(dir)
            .map_err(|e| anyhow::anyhow!("opening {} to sync it: {e}", dir.display()))?;
        d.sync_all()
            .map_err(|e| anyhow::anyhow!("syncing {}: {e}", dir.display()))?;
    }
    // Elsewhere directories cannot be opened as files; the rename is as durable as it gets.
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Rename `from` to `to` (a file or a directory whose contents are already synced), then fsync
/// the directories involved so the rename itself is on disk.
pub fn rename_durable(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::rename(from, to)
        .map_err(|e| anyhow::anyhow!("renaming {} to {}: {e}", from.display(), to.display()))?;
    sync_dir(parent_of(to))?;
    if parent_of(from) != parent_of(to) {
        sync_dir(parent_of(from))?;
    }
    Ok(())
}

/// Finish a temp file written in `path`'s directory: fsync it, rename it to `path`, fsync the
/// directory.
pub fn persist(tmp: tempfile::NamedTempFile, path: &Path) -> anyhow::Result<()> {
    tmp.as_file()
        .sync_all()
        .map_err(|e| anyhow::anyhow!("syncing {}: {e}", path.display()))?;
    tmp.persist(path)
        .map_err(|e| anyhow::anyhow!("renaming into {}: {}", path.display(), e.error))?;
    sync_dir(parent_of(path))
}

/// Write `bytes` to `path` atomically and durably: a reader (or a crash) sees the old file or the
/// new one, never a half-written one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use anyhow::Context;
    let dir = parent_of(path);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a temp file in {}", dir.display()))?;
    tmp.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))?;
    persist(tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_replaces_and_leaves_no_temp_files() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
        let q = d.path().join("b");
        std::fs::create_dir(&q).unwrap();
        rename_durable(&q, &d.path().join("c")).unwrap();
        assert!(d.path().join("c").is_dir() && !q.exists());
        assert!(rename_durable(&q, &d.path().join("e")).is_err());
    }
}
