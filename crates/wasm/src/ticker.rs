//! The epoch clock: advances the engine's epoch every [`TICK`](crate::TICK) while at
//! least one request runs, and sleeps otherwise, so an idle server does no work for the
//! WebAssembly tier.

use std::sync::{Arc, Condvar, Mutex};

use wasmtime::Engine;

use crate::lock;

pub(crate) struct Ticker {
    shared: Arc<Shared>,
}

struct Shared {
    /// Requests in flight, and whether the ticker should stop.
    state: Mutex<(usize, bool)>,
    wake: Condvar,
}

/// Held by a running request; the ticker runs while any exists.
pub(crate) struct InFlight {
    shared: Arc<Shared>,
}

impl Ticker {
    pub(crate) fn start(engine: Engine) -> Ticker {
        let shared = Arc::new(Shared {
            state: Mutex::new((0, false)),
            wake: Condvar::new(),
        });
        let s = Arc::clone(&shared);
        let spawned = std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || {
                loop {
                    {
                        let mut st = lock(&s.state);
                        while st.0 == 0 && !st.1 {
                            st = s.wake.wait(st).unwrap_or_else(|e| e.into_inner());
                        }
                        if st.1 {
                            return;
                        }
                    }
                    std::thread::sleep(crate::TICK);
                    engine.increment_epoch();
                }
            });
        if let Err(e) = spawned {
            // Without the ticker, deadlines still hold through the worker's timer; only
            // the cooperative yields of busy guests are lost.
            tracing::error!(error = %e, "could not start the wasm epoch thread");
        }
        Ticker { shared }
    }

    pub(crate) fn enter(&self) -> InFlight {
        let mut st = lock(&self.shared.state);
        st.0 += 1;
        if st.0 == 1 {
            self.shared.wake.notify_one();
        }
        InFlight {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        lock(&self.shared.state).0 -= 1;
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        lock(&self.shared.state).1 = true;
        self.shared.wake.notify_one();
    }
}
