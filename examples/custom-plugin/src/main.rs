//! A gateway binary of its own, in a few lines: the first-party plugins plus
//! `user-agent-filter`, serving a Kong-format YAML file.
//!
//! ```text
//! cargo run -p custom-plugin -- examples/custom-plugin/kong.yml 127.0.0.1:8000
//! ```

use gateway_core::config::Config;
use gateway_core::{Gateway, server::ServerSettings};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().init();
    let mut args = std::env::args().skip(1);
    let file = args.next().ok_or("usage: custom-plugin CONFIG.yml [LISTEN_ADDR]")?;
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:8000".to_string());
    let config = Config::from_file(&file)?;
    let gateway = Gateway::builder().plugins(custom_plugin::registry()).build(&config)?;
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    println!("serving {file} on http://{}", listener.local_addr()?);
    gateway
        .serve(vec![listener], ServerSettings::default(), async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
