//! A worker's heartbeat thread: every `heartbeat_interval_s` it tells the store "rank r is
//! alive, with p collectives done", on a connection of its own (so a long store wait of the main
//! thread never delays it).
//!
//! The store answers with an abort reason when the gang is being stopped after a failure; the
//! thread then raises the ring's [`Abort`] flag, so a rank blocked in a collective on a dead
//! neighbour gives up at once instead of at its timeout. When the store stays unreachable for
//! `heartbeat_timeout_s` (node 0's launcher is gone), the thread raises the flag too.
//!
//! What this does not catch by itself: a main thread that hangs while this thread still beats.
//! Its ring neighbours then wait in their next collective until `collective_timeout_s`, fail,
//! and the launcher restarts the gang. A stopped process (SIGSTOP) stops this thread as well, and
//! the store sees its heartbeats stop.

use super::auth::Credentials;
use super::client::StoreClient;
use super::ring::Abort;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What the thread needs to know.
#[derive(Clone, Debug)]
pub struct HeartbeatOptions {
    pub store_addr: String,
    pub creds: Credentials,
    pub generation: u64,
    pub rank: usize,
    pub interval: Duration,
    /// Give up on the store after this long without an answer.
    pub lost_after: Duration,
}

/// The running thread; dropping it stops the thread.
pub struct Heartbeat {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Heartbeat {
    pub fn start(
        opts: HeartbeatOptions,
        abort: Arc<Abort>,
        progress: Arc<AtomicU64>,
    ) -> std::io::Result<Heartbeat> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("heartbeat".into())
                .spawn(move || beat(opts, abort, progress, stop))?
        };
        Ok(Heartbeat {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn beat(
    opts: HeartbeatOptions,
    abort: Arc<Abort>,
    progress: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) {
    let mut client: Option<StoreClient> = None;
    let mut last_ok = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        if client.is_none() {
            client = StoreClient::connect(&opts.store_addr, &opts.creds, opts.interval).ok();
        }
        if let Some(c) = client.as_mut() {
            match c.heartbeat(opts.generation, opts.rank, progress.load(Ordering::Relaxed)) {
                Ok(reply) => {
                    last_ok = Instant::now();
                    if let Some(reason) = reply {
                        abort.set(format!("the gang is stopping: {reason}"));
                    }
                }
                Err(e) => {
                    tracing::warn!("heartbeat: {e}");
                    client = None;
                }
            }
        }
        if last_ok.elapsed() > opts.lost_after {
            abort.set(format!(
                "lost the rendezvous store at {}: no answer to heartbeats for {:.1} s",
                opts.store_addr,
                last_ok.elapsed().as_secs_f64()
            ));
        }
        // Sleep one interval, waking often enough to stop promptly.
        let until = Instant::now() + opts.interval;
        while !stop.load(Ordering::SeqCst) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20).min(opts.interval));
        }
    }
}
