#![forbid(unsafe_code)]

use yidi_common::telemetry::{self, Identity};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: yidi_registry::config::RegistryConfig = yidi_common::config::load("registry")?;
    config.validate()?;
    let telemetry =
        telemetry::init(&config.log, Identity { service: "yidi-registry", bureau_id: &config.server.bureau_id })?;
    let served = async {
        let listener = tokio::net::TcpListener::bind(config.server.listen).await?;
        println!("yidi-registry listening on {}", listener.local_addr()?); // the launcher reads this line
        yidi_registry::serve(config, listener, yidi_common::shutdown::signal()).await
    }
    .await;
    telemetry.shutdown().await;
    served
}
