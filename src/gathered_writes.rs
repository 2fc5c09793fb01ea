//! A caller's connection whose small writes, when replies come several to a round of the
//! connection's task, are gathered and sent together, not one `writev` per reply.
//!
//! Why: h2 queues a DATA frame of 256 bytes or more by reference and must flush before it can
//! queue the next one, so every reply (a 1 KiB body makes a ~1.3 KB frame) went out in its own
//! `writev`: two syscalls per unary action instead of one, each also paying the caller's side of
//! loopback TCP. While gathering, a flush of small gathered bytes is put off to the connection's
//! next round: the task is woken at once, and the bytes are written when it next reads (h2
//! reads before it writes in every round) or asks again with more than `GATHER_LIMIT`
//! gathered; the replies finished while the task waited its turn go out in the same write.
//!
//! Gathering costs that extra round, which only pays when there is more than one reply to a
//! round: it is on while the last round that wrote anything wrote `GATHER_FROM` times or more
//! (a round of one reply writes twice: the head and DATA, then the trailers). A lone reply is
//! written as h2 hands it over.
use std::{
    io::{self, IoSlice},
    pin::Pin,
    task::{ready, Context, Poll},
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// Bytes gathered before a write waits for them to go out: bounds the copy kept per connection
/// (h2's own send buffer is 16 KiB; a round of 64 small replies is ~80 KB).
const GATHER_LIMIT: usize = 64 * 1024;
/// A write this large goes straight to the socket (after what is gathered): a stream's
/// 16 KiB frames are not copied.
const DIRECT: usize = 8 * 1024;
/// Capacity kept while idle: a burst's larger buffer is freed once it has gone out.
const KEEP: usize = 16 * 1024;
/// Writes in a round from which the next round gathers: two replies or more.
const GATHER_FROM: u32 = 3;

pub struct GatheredWrites<T> {
    inner: T,
    gathered: Vec<u8>,
    /// How much of `gathered` has gone out.
    sent: usize,
    /// The task was woken to send what is gathered; cleared once it has gone.
    woken: bool,
    /// Writes taken since the round began (the first read after a write).
    writes: u32,
    /// Whether this round's flushes are put off.
    gathering: bool,
}

impl<T> GatheredWrites<T> {
    pub fn new(inner: T) -> Self {
        Self { inner, gathered: Vec::new(), sent: 0, woken: false, writes: 0, gathering: false }
    }

    fn pending(&self) -> usize {
        self.gathered.len() - self.sent
    }
}

impl<T: AsyncWrite + Unpin> GatheredWrites<T> {
    /// Writes out everything gathered.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.gathered.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.gathered[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.gathered.clear();
        if self.gathered.capacity() > KEEP {
            self.gathered = Vec::new();
        }
        self.sent = 0;
        self.woken = false;
        Poll::Ready(Ok(()))
    }

    /// Makes room for `len` more bytes: what is gathered goes out first when they would pass
    /// the limit.
    fn poll_room(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<()>> {
        if self.pending() > 0 && self.pending() + len > GATHER_LIMIT {
            ready!(self.poll_send(cx))?;
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for GatheredWrites<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // A new round: gather in it if the last round that wrote had several replies.
        if self.writes > 0 {
            self.gathering = self.writes >= GATHER_FROM;
            self.writes = 0;
        }
        // What the last round gathered goes out before anything is read. If the socket is
        // full the write's readiness wakes the task, and reading goes on meanwhile.
        if self.pending() > 0 {
            if let Poll::Ready(Err(e)) = self.poll_send(cx) {
                return Poll::Ready(Err(e));
            }
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for GatheredWrites<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let len = bufs.iter().map(|b| b.len()).sum::<usize>();
        if len == 0 {
            return Poll::Ready(Ok(0));
        }
        let written = if len >= DIRECT || !self.gathering {
            ready!(self.poll_send(cx))?;
            ready!(Pin::new(&mut self.inner).poll_write_vectored(cx, bufs))?
        } else {
            ready!(self.poll_room(cx, len))?;
            let this = &mut *self;
            for buf in bufs {
                this.gathered.extend_from_slice(buf);
            }
            len
        };
        self.writes = self.writes.saturating_add(1);
        Poll::Ready(Ok(written))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let pending = self.pending();
        if pending == 0 {
            return Pin::new(&mut self.inner).poll_flush(cx);
        }
        if self.gathering && pending < GATHER_LIMIT {
            // Put off to the next round, which this wake makes sure of.
            if !self.woken {
                self.woken = true;
                cx.waker().wake_by_ref();
            }
            return Poll::Ready(Ok(()));
        }
        ready!(self.poll_send(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_send(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<T: Connected> Connected for GatheredWrites<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        sync::{
            atomic::{AtomicUsize, Ordering},
            Arc,
        },
        task::{Wake, Waker},
    };

    /// A socket that records each write it takes; `full` makes it take none.
    #[derive(Default)]
    struct Socket {
        writes: Vec<Vec<u8>>,
        full: bool,
        shut: bool,
    }

    impl AsyncRead for Socket {
        fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, _: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for Socket {
        fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            if self.full {
                return Poll::Pending;
            }
            self.writes.push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            if self.full {
                return Poll::Pending;
            }
            let all: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            let len = all.len();
            self.writes.push(all);
            Poll::Ready(Ok(len))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.shut = true;
            Poll::Ready(Ok(()))
        }
    }

    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    struct Io {
        io: GatheredWrites<Socket>,
        wakes: Arc<Wakes>,
        waker: Waker,
    }

    impl Io {
        fn new() -> Self {
            let wakes = Arc::new(Wakes::default());
            let waker = Waker::from(wakes.clone());
            Self { io: GatheredWrites::new(Socket::default()), wakes, waker }
        }
        fn flush(&mut self) -> Poll<io::Result<()>> {
            let waker = self.waker.clone();
            Pin::new(&mut self.io).poll_flush(&mut Context::from_waker(&waker))
        }
        fn shutdown(&mut self) -> Poll<io::Result<()>> {
            let waker = self.waker.clone();
            Pin::new(&mut self.io).poll_shutdown(&mut Context::from_waker(&waker))
        }
        /// A frame as h2 hands a chained DATA frame over: its head and payload, then a flush.
        fn frame(&mut self, head: &[u8], payload: &[u8]) -> Poll<io::Result<()>> {
            let waker = self.waker.clone();
            let mut cx = Context::from_waker(&waker);
            let io = Pin::new(&mut self.io);
            let n = ready!(io.poll_write_vectored(&mut cx, &[IoSlice::new(head), IoSlice::new(payload)]))?;
            assert_eq!(n, head.len() + payload.len());
            Pin::new(&mut self.io).poll_flush(&mut cx)
        }
        fn read(&mut self) -> Poll<io::Result<()>> {
            let waker = self.waker.clone();
            let mut cx = Context::from_waker(&waker);
            let mut space = [0u8; 16];
            let mut buf = ReadBuf::new(&mut space);
            Pin::new(&mut self.io).poll_read(&mut cx, &mut buf)
        }
        /// A round of several replies, written as h2 hands them over; the next round gathers.
        fn busy() -> Self {
            let mut io = Self::new();
            for _ in 0..GATHER_FROM {
                assert!(io.frame(b"head", b"reply").is_ready());
            }
            assert!(io.read().is_pending());
            assert!(io.io.gathering);
            io.io.inner.writes.clear();
            assert_eq!(io.wakes(), 0);
            io
        }
        fn writes(&self) -> &[Vec<u8>] {
            &self.io.inner.writes
        }
        fn wakes(&self) -> usize {
            self.wakes.0.load(Ordering::SeqCst)
        }
    }

    #[test]
    fn after_a_busy_round_a_rounds_frames_go_out_in_one_write_when_the_next_round_reads() {
        let mut io = Io::busy();
        for reply in [b'a', b'b', b'c'] {
            assert!(io.frame(b"head", &[reply; 1300]).is_ready());
        }
        assert!(io.writes().is_empty(), "flushes within the round are put off");
        assert_eq!(io.wakes(), 1, "the task is woken once to come back for them");
        assert!(io.read().is_pending());
        assert_eq!(io.writes().len(), 1);
        let sent = &io.writes()[0];
        assert_eq!(sent.len(), 3 * (4 + 1300));
        assert_eq!((sent[4], sent[4 + 1304], sent[4 + 2 * 1304]), (b'a', b'b', b'c'), "in order");
        // Nothing gathered: a flush goes straight to the socket and wakes nothing.
        assert!(io.flush().is_ready());
        assert_eq!((io.writes().len(), io.wakes()), (1, 1));
    }

    #[test]
    fn a_large_write_follows_what_is_gathered_uncopied() {
        let mut io = Io::busy();
        assert!(io.frame(b"h1", b"small").is_ready());
        assert!(io.frame(b"h2", &[7; DIRECT]).is_ready());
        assert_eq!(io.writes().len(), 2);
        assert_eq!(io.writes()[0], b"h1small");
        assert_eq!(io.writes()[1].len(), 2 + DIRECT);
        assert!(io.io.gathered.is_empty());
    }

    #[test]
    fn past_the_limit_what_is_gathered_goes_out_first() {
        let mut io = Io::busy();
        let piece = [1u8; DIRECT - 1];
        let fits = GATHER_LIMIT / piece.len();
        for _ in 0..fits {
            assert!(io.frame(b"", &piece).is_ready());
        }
        assert!(io.writes().is_empty());
        assert!(io.frame(b"", &piece).is_ready());
        assert_eq!(io.writes().len(), 1, "the gathered bytes went out before the next piece was taken");
        assert_eq!(io.writes()[0].len(), fits * piece.len());
        assert_eq!(io.io.pending(), piece.len());
    }

    #[test]
    fn a_full_socket_holds_writes_back_and_reading_goes_on() {
        let mut io = Io::busy();
        io.io.inner.full = true;
        let piece = [2u8; DIRECT - 1];
        for _ in 0..GATHER_LIMIT / piece.len() {
            assert!(io.frame(b"", &piece).is_ready());
        }
        assert!(io.frame(b"", &piece).is_pending(), "no more is taken while the gathered bytes cannot go");
        assert!(io.read().is_pending(), "the read is the socket's, not an error");
        io.io.inner.full = false;
        assert!(io.read().is_pending());
        assert_eq!(io.writes().len(), 1);
        assert_eq!(io.io.pending(), 0);
    }

    #[test]
    fn shutdown_sends_what_is_gathered_and_a_burst_frees_its_buffer() {
        let mut io = Io::busy();
        for _ in 0..8 {
            assert!(io.frame(b"", &[3u8; 4096]).is_ready());
        }
        assert!(io.io.gathered.capacity() > KEEP);
        assert!(io.shutdown().is_ready());
        assert_eq!(io.writes().concat().len(), 8 * 4096);
        assert!(io.io.inner.shut);
        assert_eq!(io.io.gathered.capacity(), 0, "a burst's buffer is not kept");
    }

    #[test]
    fn a_lone_reply_is_written_as_handed_over_and_gathering_follows_the_last_round() {
        let mut io = Io::new();
        // One reply: its head and DATA, then its trailers.
        assert!(io.frame(b"head", &[1; 1300]).is_ready());
        assert!(io.frame(b"trailers", b"").is_ready());
        assert_eq!(io.writes().len(), 2, "written at once, as h2 handed them over");
        assert_eq!(io.wakes(), 0, "no round is added");
        assert!(io.read().is_pending());
        assert!(!io.io.gathering);
        // Three writes in a round (two replies or more): the next round gathers.
        for _ in 0..GATHER_FROM {
            assert!(io.frame(b"head", b"reply").is_ready());
        }
        assert_eq!(io.writes().len(), 2 + GATHER_FROM as usize);
        assert!(io.read().is_pending());
        assert!(io.io.gathering);
        // A round that writes nothing (the wake's own) keeps it; a round of one reply ends it.
        assert!(io.read().is_pending());
        assert!(io.io.gathering);
        assert!(io.frame(b"head", b"lone").is_ready());
        assert!(io.frame(b"trailers", b"").is_ready());
        assert_eq!(io.writes().len(), 2 + GATHER_FROM as usize, "gathered while the round gathers");
        assert!(io.read().is_pending());
        assert_eq!(io.writes().len(), 3 + GATHER_FROM as usize, "sent as the next round read");
        assert!(!io.io.gathering);
    }
}
