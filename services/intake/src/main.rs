#![forbid(unsafe_code)]

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: yidi_intake::config::IntakeConfig = yidi_common::config::load("intake")?;
    config.validate()?;
    yidi_common::telemetry::init(&config.log);
    let listener = tokio::net::TcpListener::bind(config.server.listen).await?;
    println!("yidi-intake listening on {}", listener.local_addr()?);
    yidi_intake::serve(config, listener, yidi_common::shutdown::signal()).await
}
