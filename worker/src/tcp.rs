//! A TCP listener's connection: bytes copied both ways between the client and one backend.

use std::io::{self, Read, Write};
use std::time::Instant;

use mio::net::TcpStream;
use mio::{Interest, Token};

use crate::http::{Context, Status};
use crate::pool::Checkout;

struct Pipe {
    buf: Checkout,
    start: usize,
    end: usize,
}

impl Pipe {
    fn fill(&mut self, from: &mut TcpStream) -> io::Result<usize> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        let space = kawa::AsBuffer::as_mut_buffer(&mut self.buf)
            .get_mut(self.end..)
            .unwrap_or_default();
        if space.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = from.read(space)?;
        self.end += n;
        Ok(n)
    }

    fn drain(&mut self, to: &mut TcpStream) -> io::Result<usize> {
        let data = kawa::AsBuffer::as_buffer(&self.buf)
            .get(self.start..self.end)
            .unwrap_or_default();
        if data.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = to.write(data)?;
        self.start += n;
        Ok(n)
    }
}

pub struct TcpSession {
    pub front: TcpStream,
    back: Option<TcpStream>,
    cluster: String,
    backend_id: String,
    up: Pipe,
    down: Pipe,
    front_done: bool,
    back_done: bool,
    pub deadline: Instant,
}

impl TcpSession {
    /// Connects to a backend of `cluster` and returns the session, or None when no backend is
    /// available (the client connection is then closed).
    pub fn open(
        front: TcpStream,
        cluster: &str,
        back_token: Token,
        up: Checkout,
        down: Checkout,
        ctx: &mut Context<'_>,
    ) -> Option<TcpSession> {
        let balancer = ctx.balancers.clusters.get_mut(cluster)?;
        let slot = balancer.pick(ctx.rng, ctx.now, None, &[])?;
        let (address, backend_id) = (slot.address, slot.id.clone());
        let mut back = TcpStream::connect(address).ok()?;
        ctx.registry
            .register(&mut back, back_token, Interest::READABLE | Interest::WRITABLE)
            .ok()?;
        ctx.balancers.connection_opened(cluster, &backend_id);
        Some(TcpSession {
            front,
            back: Some(back),
            cluster: cluster.to_string(),
            backend_id,
            up: Pipe {
                buf: up,
                start: 0,
                end: 0,
            },
            down: Pipe {
                buf: down,
                start: 0,
                end: 0,
            },
            front_done: false,
            back_done: false,
            deadline: ctx.now + ctx.timeouts.client_idle,
        })
    }

    pub fn close(&mut self, ctx: &mut Context<'_>) {
        if let Some(mut back) = self.back.take() {
            let _ = ctx.registry.deregister(&mut back);
            ctx.balancers.connection_closed(&self.cluster, &self.backend_id);
        }
        let _ = ctx.registry.deregister(&mut self.front);
    }

    pub fn run(&mut self, ctx: &mut Context<'_>) -> Status {
        let Some(back) = &mut self.back else {
            return Status::Close;
        };
        loop {
            let mut progress = false;
            if !self.front_done {
                match self.up.fill(&mut self.front) {
                    Ok(0) => {
                        self.front_done = true;
                    }
                    Ok(_) => progress = true,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => return Status::Close,
                }
            }
            match self.up.drain(back) {
                Ok(_) => progress = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return Status::Close,
            }
            if self.front_done && self.up.start == self.up.end {
                let _ = back.shutdown(std::net::Shutdown::Write);
            }
            if !self.back_done {
                match self.down.fill(back) {
                    Ok(0) => self.back_done = true,
                    Ok(_) => progress = true,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => return Status::Close,
                }
            }
            match self.down.drain(&mut self.front) {
                Ok(_) => progress = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return Status::Close,
            }
            if self.back_done && self.down.start == self.down.end {
                return Status::Close;
            }
            if !progress {
                self.deadline = ctx.now + ctx.timeouts.client_idle;
                return Status::Open;
            }
        }
    }
}
