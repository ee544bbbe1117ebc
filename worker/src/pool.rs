//! Fixed-size I/O buffers, reused across connections. The pool grows on demand up to its cap
//! (two buffers per connection at `max_connections`); a released buffer goes back to the pool.

use std::cell::RefCell;
use std::rc::Rc;

#[derive(Debug)]
struct Inner {
    free: Vec<Box<[u8]>>,
    size: usize,
    outstanding: usize,
    cap: usize,
}

/// A shared pool of buffers of one size.
#[derive(Debug, Clone)]
pub struct Pool(Rc<RefCell<Inner>>);

impl Pool {
    pub fn new(size: usize, cap: usize) -> Pool {
        Pool(Rc::new(RefCell::new(Inner {
            free: Vec::new(),
            size,
            outstanding: 0,
            cap,
        })))
    }

    /// A buffer, or None when the cap is reached.
    pub fn checkout(&self) -> Option<Checkout> {
        let mut inner = self.0.borrow_mut();
        if inner.outstanding >= inner.cap {
            return None;
        }
        let buf = inner
            .free
            .pop()
            .unwrap_or_else(|| vec![0u8; inner.size].into_boxed_slice());
        inner.outstanding += 1;
        Some(Checkout {
            buf,
            pool: self.clone(),
        })
    }

    /// A checkout that holds no buffer yet: a new connection takes its buffers when its first
    /// bytes arrive, so connections that only sit open cost none.
    pub fn deferred(&self) -> Checkout {
        Checkout {
            buf: Box::default(),
            pool: self.clone(),
        }
    }

    /// Buffers in use.
    pub fn outstanding(&self) -> usize {
        self.0.borrow().outstanding
    }
}

/// A buffer on loan from the pool; returned when dropped. An idle connection can give its
/// buffer back early ([`release`](Checkout::release)) and take one again when bytes arrive
/// ([`reacquire`](Checkout::reacquire)), so that thousands of idle keep-alive clients cost no
/// buffer memory.
#[derive(Debug)]
pub struct Checkout {
    buf: Box<[u8]>,
    pool: Pool,
}

impl Checkout {
    /// Whether the buffer is held (a released one is empty).
    pub fn is_held(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Gives the buffer back to the pool; the checkout becomes an empty slice.
    pub fn release(&mut self) {
        if self.is_held() {
            let buf = std::mem::take(&mut self.buf);
            self.pool.give_back(buf);
        }
    }

    /// Moves the buffer into a new checkout (the pipe that follows a 101 takes over an HTTP
    /// session's buffers); this one is left released.
    pub fn take(&mut self) -> Checkout {
        Checkout {
            buf: std::mem::take(&mut self.buf),
            pool: self.pool.clone(),
        }
    }

    /// Takes a buffer again after [`release`](Checkout::release). False when the pool is at its cap.
    pub fn reacquire(&mut self) -> bool {
        if self.is_held() {
            return true;
        }
        match self.pool.take() {
            Some(buf) => {
                self.buf = buf;
                true
            }
            None => false,
        }
    }
}

impl Pool {
    fn take(&self) -> Option<Box<[u8]>> {
        let mut inner = self.0.borrow_mut();
        if inner.outstanding >= inner.cap {
            return None;
        }
        inner.outstanding += 1;
        Some(
            inner
                .free
                .pop()
                .unwrap_or_else(|| vec![0u8; inner.size].into_boxed_slice()),
        )
    }

    fn give_back(&self, buf: Box<[u8]>) {
        let mut inner = self.0.borrow_mut();
        inner.outstanding = inner.outstanding.saturating_sub(1);
        // Keep a bounded number of idle buffers.
        if inner.free.len() < 256 {
            inner.free.push(buf);
        }
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        self.release();
    }
}

impl kawa::AsBuffer for Checkout {
    fn as_buffer(&self) -> &[u8] {
        &self.buf
    }

    fn as_mut_buffer(&mut self) -> &mut [u8] {
        &mut self.buf
    }
}
