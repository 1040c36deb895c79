#![forbid(unsafe_code)]

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: yidi_verification::config::VerificationConfig = yidi_common::config::load("verification")?;
    config.validate()?;
    yidi_common::telemetry::init(&config.log);
    let listener = tokio::net::TcpListener::bind(config.server.listen).await?;
    println!("yidi-verification listening on {}", listener.local_addr()?); // the test harness reads this line
    yidi_verification::serve(config, listener, yidi_common::shutdown::signal()).await
}
