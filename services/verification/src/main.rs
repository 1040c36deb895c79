#![forbid(unsafe_code)]

use yidi_verification::config::VerificationConfig;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    yidi_bureau::process::run("verification", VerificationConfig::validate, yidi_verification::serve).await
}
