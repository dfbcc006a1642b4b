//! Output files that appear only when complete.
//!
//! An [`AtomicFile`] writes to a hidden temporary file in the target's directory (so that the
//! final rename stays on one file system) and renames it over the target in
//! [`AtomicFile::commit`]. Dropped without a commit (an error, a full disk, a panic), it removes
//! the temporary file, and whatever was at the target before is left untouched: a reader never
//! sees a half-written output under the final name.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Distinguishes the temporary files of one process (several outputs may share a directory).
static NEXT_TEMP: AtomicU64 = AtomicU64::new(0);

/// A file being written under a temporary name, renamed to its target on [`commit`].
///
/// [`commit`]: AtomicFile::commit
pub struct AtomicFile {
    writer: Option<BufWriter<File>>,
    temp: PathBuf,
    target: PathBuf,
}

impl AtomicFile {
    /// Starts writing `target`: creates `.<name>.<pid>.<counter>.tmp` beside it.
    pub fn create(target: &Path) -> io::Result<Self> {
        let name = target.file_name().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("'{}' does not name a file", target.display()),
            )
        })?;
        let dir = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let mut temp_name = std::ffi::OsString::from(".");
        temp_name.push(name);
        temp_name.push(format!(
            ".{}.{}.tmp",
            std::process::id(),
            NEXT_TEMP.fetch_add(1, Ordering::Relaxed)
        ));
        let temp = dir.join(temp_name);
        // `create_new`: never write through a file (or link) that someone else put there.
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)?;
        Ok(AtomicFile {
            writer: Some(BufWriter::new(file)),
            temp,
            target: target.to_path_buf(),
        })
    }

    /// The final path.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Flushes, syncs to disk, and renames the temporary file over the target.
    pub fn commit(mut self) -> io::Result<()> {
        let writer = self
            .writer
            .take()
            .expect("the writer is only taken here, and commit consumes self");
        let file = writer
            .into_inner()
            .map_err(io::IntoInnerError::into_error)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&self.temp, &self.target)
        // On a failed rename, Drop removes the temporary file.
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.active()?.write(buf)
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.active()?.write_all(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.active()?.flush()
    }
}

impl AtomicFile {
    fn active(&mut self) -> io::Result<&mut BufWriter<File>> {
        self.writer
            .as_mut()
            .ok_or_else(|| io::Error::other("the output file was already committed"))
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        // After a successful commit the temporary name no longer exists; otherwise it is an
        // incomplete output and goes.
        drop(self.writer.take());
        match std::fs::remove_file(&self.temp) {
            Ok(()) => log::debug!("removed incomplete output {}", self.temp.display()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => log::warn!("could not remove {}: {e}", self.temp.display()),
        }
    }
}
