#![forbid(unsafe_code)]

use yidi_issuance::config::IssuanceConfig;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    yidi_bureau::process::run("issuance", IssuanceConfig::validate, yidi_issuance::serve).await
}
