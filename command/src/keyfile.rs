//! Private keys in memory files: how the supervisor keeps a key, for a keyring that may have to be
//! respawned and for `save-state`, without holding it in its own memory.
//!
//! [`KeyFile::create`] puts the key in a file made by `memfd_secret(2)` where the kernel offers it
//! (its pages are never swapped and are taken out of the kernel's direct map) and by
//! `memfd_create(2)` otherwise, sealed against any change. The file is mapped only while it is
//! written and while [`KeyFile::with_key`] reads it; the rest of the time the key is in no page of
//! the process's address space. The bytes [`KeyFile::create`] was given are zeroized.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use zeroize::Zeroize;

/// Where a key file's pages live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// `memfd_secret(2)`: never swapped, out of the kernel's direct map.
    Secret,
    /// `memfd_create(2)` with seals: a sealed tmpfs file (may be swapped where swap exists).
    Sealed,
}

impl Backing {
    pub fn describe(self) -> &'static str {
        match self {
            Backing::Secret => "memfd_secret (never swapped, out of the kernel's direct map)",
            Backing::Sealed => "sealed memfd (memfd_secret is not available)",
        }
    }
}

/// A private key held in a memory file.
#[derive(Debug)]
pub struct KeyFile {
    fd: OwnedFd,
    len: usize,
    backing: Backing,
}

/// A shared mapping, unmapped on drop.
struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
}

impl Mapping {
    fn new(fd: BorrowedFd<'_>, len: usize, writable: bool) -> io::Result<Mapping> {
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh shared mapping of a file we hold; nothing else refers to the address.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd.as_raw_fd(), 0) };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping { ptr, len })
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is `len` bytes long, readable, and lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.cast::<u8>(), self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`; only writable mappings are written through.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.cast::<u8>(), self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `Mapping::new` and is unmapped once.
        unsafe {
            libc::munmap(self.ptr, self.len);
        }
    }
}

fn secret_fd() -> io::Result<OwnedFd> {
    // SAFETY: memfd_secret takes one flags argument and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_memfd_secret, libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor was just created and is ours alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn sealed_fd() -> io::Result<OwnedFd> {
    // SAFETY: the name is a NUL-terminated literal; memfd_create returns a new descriptor or -1.
    let fd = unsafe { libc::memfd_create(c"rampart-key".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl KeyFile {
    /// Moves `key` into a new memory file and zeroizes `key`, whatever the outcome.
    pub fn create(key: &mut String) -> io::Result<KeyFile> {
        // memfd_secret can fail after the file exists (its mapping counts against
        // RLIMIT_MEMLOCK without CAP_IPC_LOCK): a sealed memfd is the fallback in every case.
        let result = Self::write(key.as_bytes(), true).or_else(|_| Self::write(key.as_bytes(), false));
        key.zeroize();
        result
    }

    fn write(key: &[u8], prefer_secret: bool) -> io::Result<KeyFile> {
        if key.is_empty() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty key"));
        }
        let secret = if prefer_secret { secret_fd().ok() } else { None };
        let (fd, backing) = match secret {
            Some(fd) => (fd, Backing::Secret),
            None => (sealed_fd()?, Backing::Sealed),
        };
        let len = key.len();
        let size =
            libc::off_t::try_from(len).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "key too large"))?;
        // SAFETY: ftruncate on a descriptor we own.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), size) } != 0 {
            return Err(io::Error::last_os_error());
        }
        {
            let mut map = Mapping::new(fd.as_fd(), len, true)?;
            map.bytes_mut().copy_from_slice(key);
        }
        if backing == Backing::Sealed {
            let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL;
            // SAFETY: fcntl on a descriptor we own; no writable mapping remains.
            if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(KeyFile { fd, len, backing })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn backing(&self) -> Backing {
        self.backing
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Reads the key through a short-lived mapping.
    pub fn with_key<R>(&self, f: impl FnOnce(&[u8]) -> R) -> io::Result<R> {
        with_mapped(self.fd(), self.len, f)
    }
}

/// Maps the first `len` bytes of a key file read-only, hands them to `f`, and unmaps them.
fn with_mapped<R>(fd: BorrowedFd<'_>, len: usize, f: impl FnOnce(&[u8]) -> R) -> io::Result<R> {
    if len == 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty key file"));
    }
    let map = Mapping::new(fd, len, false)?;
    Ok(f(map.bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_goes_in_and_comes_back_and_the_source_is_wiped() {
        let mut key = String::from("-----BEGIN PRIVATE KEY-----\nabc\n-----END PRIVATE KEY-----\n");
        let expected = key.clone();
        let file = KeyFile::create(&mut key).unwrap();
        assert!(key.is_empty(), "the source string is zeroized and cleared");
        assert_eq!(file.len(), expected.len());
        let back = file.with_key(|b| b.to_vec()).unwrap();
        assert_eq!(back, expected.as_bytes());
        // A second descriptor for the same file (what the keyring receives) reads the same.
        let dup = file.fd().try_clone_to_owned().unwrap();
        let again = with_mapped(dup.as_fd(), file.len(), <[u8]>::to_vec).unwrap();
        assert_eq!(again, expected.as_bytes());
    }

    #[test]
    fn a_sealed_file_cannot_be_changed() {
        let file = KeyFile::write(b"secret", false).unwrap();
        assert_eq!(file.backing(), Backing::Sealed);
        // SAFETY: test-only write and truncate attempts on our own descriptor.
        let written = unsafe { libc::write(file.fd().as_raw_fd(), b"x".as_ptr().cast(), 1) };
        assert_eq!(written, -1, "a sealed key file refuses writes");
        // SAFETY: as above.
        assert_ne!(unsafe { libc::ftruncate(file.fd().as_raw_fd(), 1) }, 0, "and shrinking");
        assert!(
            Mapping::new(file.fd(), file.len(), true).is_err(),
            "and writable mappings"
        );
        assert_eq!(file.with_key(<[u8]>::to_vec).unwrap(), b"secret");
    }

    #[test]
    fn memfd_secret_is_used_where_the_kernel_offers_it() {
        let offered = secret_fd().is_ok();
        let mut key = String::from("k");
        let file = KeyFile::create(&mut key).unwrap();
        assert_eq!(file.backing() == Backing::Secret, offered);
    }

    #[test]
    fn an_empty_key_is_refused() {
        let mut key = String::new();
        assert!(KeyFile::create(&mut key).is_err());
        let fd = sealed_fd().unwrap();
        assert!(with_mapped(fd.as_fd(), 0, |_| ()).is_err());
    }
}
