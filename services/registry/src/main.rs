#![forbid(unsafe_code)]

use yidi_registry::config::RegistryConfig;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    yidi_bureau::process::run("registry", RegistryConfig::validate, yidi_registry::serve).await
}
