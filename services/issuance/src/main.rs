#![forbid(unsafe_code)]

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: yidi_issuance::config::IssuanceConfig = yidi_common::config::load("issuance")?;
    config.validate()?;
    yidi_common::telemetry::init(&config.log);
    let listener = tokio::net::TcpListener::bind(config.server.listen).await?;
    println!("yidi-issuance listening on {}", listener.local_addr()?);
    yidi_issuance::serve(config, listener, yidi_common::shutdown::signal()).await
}
