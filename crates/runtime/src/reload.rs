//! When to re-read what may change under a running service (the directory, signing key files):
//! every few seconds, and at once on SIGHUP, the operator's "take the new files now".
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::shutdown::Shutdown;

/// Calls `on_tick(forced)` every `every` (`forced = false`) and on each SIGHUP (`forced = true`)
/// until `shutdown`. `what` names the task in logs.
pub fn spawn(
    what: &'static str,
    every: Duration,
    shutdown: Shutdown,
    mut on_tick: impl FnMut(bool) + Send + 'static,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut hangup = Hangup::new(what);
        let mut interval = tokio::time::interval(every.max(Duration::from_millis(100)));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is immediate; what was just loaded needs no second look.
        interval.tick().await;
        loop {
            tokio::select! {
                () = shutdown.wait() => break,
                _ = interval.tick() => on_tick(false),
                () = hangup.recv() => {
                    tracing::info!(what, "SIGHUP: reloading");
                    on_tick(true);
                }
            }
        }
    })
}

/// SIGHUP where there is one; never elsewhere (or if the handler cannot be installed).
struct Hangup {
    #[cfg(unix)]
    signal: Option<tokio::signal::unix::Signal>,
}

impl Hangup {
    fn new(what: &'static str) -> Self {
        #[cfg(unix)]
        {
            let signal = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
                Ok(signal) => Some(signal),
                Err(error) => {
                    tracing::warn!(what, %error, "no SIGHUP handler: reloads only by polling");
                    None
                }
            };
            Self { signal }
        }
        #[cfg(not(unix))]
        {
            let _ = what;
            Self {}
        }
    }

    async fn recv(&mut self) {
        #[cfg(unix)]
        if let Some(signal) = &mut self.signal {
            if signal.recv().await.is_some() {
                return;
            }
            self.signal = None;
        }
        std::future::pending::<()>().await
    }
}
