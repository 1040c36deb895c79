#![forbid(unsafe_code)]

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: yidi_registry::config::RegistryConfig = yidi_common::config::load("registry")?;
    config.validate()?;
    yidi_common::telemetry::init(&config.log);
    let listener = tokio::net::TcpListener::bind(config.server.listen).await?;
    println!("yidi-registry listening on {}", listener.local_addr()?);
    yidi_registry::serve(config, listener, yidi_common::shutdown::signal()).await
}
