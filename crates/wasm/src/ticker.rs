//! The epoch clock: advances the engine's epoch every [`TICK`](crate::TICK) while
//! requests run, and sleeps once none has run for [`LINGER`], so an idle server does no
//! work for the WebAssembly tier.
//!
//! It lingers rather than parking the moment the last request ends: at one request at a
//! time, parking and waking per request would cost each a thread wake-up.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use wasmtime::Engine;

use crate::lock;

/// How long the ticker keeps ticking after the last request.
const LINGER: Duration = Duration::from_secs(1);

pub(crate) struct Ticker {
    shared: Arc<Shared>,
}

struct Shared {
    /// Requests in flight (read on every request without the lock).
    running: AtomicUsize,
    /// Whether the ticker sleeps on `wake`, and whether it should stop.
    state: Mutex<Parking>,
    wake: Condvar,
}

#[derive(Default)]
struct Parking {
    parked: bool,
    stop: bool,
}

/// Held by a running request; the ticker runs while any exists.
pub(crate) struct InFlight {
    shared: Arc<Shared>,
}

impl Ticker {
    pub(crate) fn start(engine: Engine) -> Ticker {
        let shared = Arc::new(Shared {
            running: AtomicUsize::new(0),
            state: Mutex::new(Parking::default()),
            wake: Condvar::new(),
        });
        let s = Arc::clone(&shared);
        let spawned = std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || {
                let mut last_busy = Instant::now();
                loop {
                    if s.running.load(Ordering::SeqCst) > 0 {
                        last_busy = Instant::now();
                    } else if last_busy.elapsed() >= LINGER {
                        let mut st = lock(&s.state);
                        st.parked = true;
                        // Checked again under the lock: `enter` counts first, then looks
                        // for a parked ticker under the same lock, so no wake-up is lost.
                        while s.running.load(Ordering::SeqCst) == 0 && !st.stop {
                            st = s.wake.wait(st).unwrap_or_else(|e| e.into_inner());
                        }
                        st.parked = false;
                        if st.stop {
                            return;
                        }
                        last_busy = Instant::now();
                    }
                    std::thread::sleep(crate::TICK);
                    engine.increment_epoch();
                    if lock(&s.state).stop {
                        return;
                    }
                }
            });
        if let Err(e) = spawned {
            // Without the ticker, deadlines still hold through the request's timer; only
            // the cooperative yields of busy guests are lost.
            tracing::error!(error = %e, "could not start the wasm epoch thread");
        }
        Ticker { shared }
    }

    pub(crate) fn enter(&self) -> InFlight {
        self.shared.running.fetch_add(1, Ordering::SeqCst);
        let st = lock(&self.shared.state);
        if st.parked {
            self.shared.wake.notify_one();
        }
        drop(st);
        InFlight {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.shared.running.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        lock(&self.shared.state).stop = true;
        self.shared.wake.notify_one();
    }
}
