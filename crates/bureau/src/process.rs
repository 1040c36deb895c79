//! A bureau's `main`: load its configuration, check it, start telemetry, listen, serve until a
//! signal, flush telemetry. Each service's `main.rs` is one call of [`run`].
use std::{future::Future, pin::Pin};

use serde::de::DeserializeOwned;
use tokio::net::TcpListener;
use yidi_runtime::{
    config::{self, ConfigError},
    shutdown,
    telemetry::{self, Identity},
};

use crate::config::BureauConfig;

/// SIGINT or SIGTERM.
pub type ShutdownSignal = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Runs the bureau `yidi-{service}` with the configuration `C` (file `deploy/config/{service}.toml`
/// unless `--config` or `$YIDI_CONFIG` says otherwise), checked by `validate`, served by `serve`.
pub async fn run<C, Served>(
    service: &'static str,
    validate: fn(&C) -> Result<(), ConfigError>,
    serve: impl FnOnce(C, TcpListener, ShutdownSignal) -> Served,
) -> anyhow::Result<()>
where
    C: BureauConfig + DeserializeOwned,
    Served: Future<Output = anyhow::Result<()>>,
{
    let config: C = config::load(service)?;
    validate(&config)?;
    let binary = format!("yidi-{service}");
    let sections = config.sections();
    let telemetry =
        telemetry::init(sections.log, Identity { service: &binary, bureau_id: &sections.server.bureau_id })?;
    let listen = sections.server.listen;
    let served = async {
        let listener = TcpListener::bind(listen).await?;
        println!("{binary} listening on {}", listener.local_addr()?); // the launcher reads this line
        serve(config, listener, Box::pin(shutdown::signal())).await
    }
    .await;
    telemetry.shutdown().await;
    served
}
