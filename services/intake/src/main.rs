#![forbid(unsafe_code)]

use yidi_intake::config::IntakeConfig;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    yidi_bureau::process::run("intake", IntakeConfig::validate, yidi_intake::serve).await
}
