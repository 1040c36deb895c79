//! One way to run a bureau in process: its `serve` on a fresh loopback listener, a channel to it,
//! and a shutdown trigger that fires when the handle is stopped or dropped.
use std::{future::Future, net::SocketAddr, pin::Pin, time::Duration};

use anyhow::Context;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;

/// What a bureau's `serve` waits on: resolves when the test wants it to stop.
pub type Shutdown = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// How long a bureau may take to answer health checks, or to stop.
pub const WAIT: Duration = Duration::from_secs(30);

/// A bureau running in this process. Dropping it triggers the shutdown (without waiting for it);
/// [`Bureau::stop`] also waits for the server to end and reports how it ended.
#[derive(Debug)]
pub struct Bureau {
    address: SocketAddr,
    channel: Channel,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Bureau {
    /// Binds 127.0.0.1:0, spawns `serve(listener, shutdown)` (e.g.
    /// `|listener, shutdown| yidi_intake::serve(config, listener, shutdown)`) and waits until it
    /// answers health checks as serving. A server that ends before that is an error carrying why.
    pub async fn start<S, F>(serve: S) -> anyhow::Result<Self>
    where
        S: FnOnce(TcpListener, Shutdown) -> F,
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown: Shutdown = Box::pin(async move {
            let _ = stopped.await;
        });
        let task = tokio::spawn(serve(listener, shutdown));
        let mut bureau = Self {
            address,
            channel: Channel::from_static("http://127.0.0.1:1").connect_lazy(),
            stop: Some(stop),
            task: Some(task),
        };
        bureau.channel = bureau.wait_until_serving().await?;
        Ok(bureau)
    }

    async fn wait_until_serving(&mut self) -> anyhow::Result<Channel> {
        let deadline = tokio::time::Instant::now() + WAIT;
        let endpoint = Channel::from_shared(format!("http://{}", self.address))?;
        while tokio::time::Instant::now() < deadline {
            if let Some(task) = self.task.take_if(|task| task.is_finished()) {
                return Err(task.await?.err().unwrap_or_else(|| anyhow::anyhow!("the server ended")));
            }
            if let Ok(channel) = endpoint.connect().await
                && yidi_grpc::client::is_serving(&channel).await
            {
                return Ok(channel);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        anyhow::bail!("the server at {} did not start serving within {WAIT:?}", self.address)
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// `http://<address>`, for a directory entry or a config.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    /// A connected channel to the bureau (cheap to clone).
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// Triggers the shutdown and waits (up to [`WAIT`]) for the server to end; its error, if any.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.trigger_shutdown();
        match self.task.take() {
            Some(task) => tokio::time::timeout(WAIT, task).await.context("the server did not stop")??,
            None => Ok(()),
        }
    }

    /// Triggers the shutdown without waiting for it; [`Bureau::stop`] still waits for the end.
    pub fn trigger_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Drop for Bureau {
    fn drop(&mut self) {
        self.trigger_shutdown();
    }
}

/// The endpoint of a loopback port nobody listens on (bound, then released).
pub fn closed_endpoint() -> String {
    let address = std::net::TcpListener::bind("127.0.0.1:0").and_then(|closed| closed.local_addr());
    address.map_or_else(|_| "http://127.0.0.1:1".to_owned(), |address| format!("http://{address}"))
}
