//! The clients an executor sends with: the shared default client, and a small bounded cache of
//! clients built for actions that bring their own TLS options or proxy. Connections made with
//! different TLS or proxy settings never share a pool, since each setting has its own client.
use super::{
    error::SendFailure,
    http_client::{ClientBuildError, ClientSettings, HttpClient},
    proxy::Proxies,
};
use crate::action::ErrorKind;
use crate::action::{HttpAction, ProxyUrl, TlsOptions};
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

/// Clients kept for non-default options; the least recently used goes when a new one is needed.
pub const MAX_CACHED_CLIENTS: usize = 32;

/// What makes an action's client different from the default one. The whole options are the
/// key (not a hash of them), so two settings can never collide into one pool.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    tls: TlsOptions,
    proxy: Option<ProxyUrl>,
}

struct Cached {
    client: HttpClient,
    last_used: u64,
}

#[derive(Default)]
struct Cache {
    entries: HashMap<Key, Cached>,
    tick: u64,
}

/// The default client plus clients for per-action options.
#[derive(Clone)]
pub struct Clients {
    default: HttpClient,
    settings: Arc<ClientSettings>,
    cache: Arc<Mutex<Cache>>,
}

impl Clients {
    pub fn new(settings: &ClientSettings) -> Result<Self, ClientBuildError> {
        Ok(Self {
            default: HttpClient::new(settings)?,
            settings: Arc::new(settings.clone()),
            cache: Arc::default(),
        })
    }

    /// The client for `action`: the default one unless it sets TLS options or a proxy. A client
    /// that cannot be built (options validation could not foresee) fails the action unsent.
    pub fn for_action(&self, action: &HttpAction) -> Result<HttpClient, SendFailure> {
        if action.tls.is_default() && action.proxy.is_none() {
            return Ok(self.default.clone());
        }
        let key = Key { tls: action.tls.clone(), proxy: action.proxy.clone() };
        // A poisoned lock only means another thread panicked mid-update; the map is still usable.
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.tick += 1;
        let tick = cache.tick;
        if let Some(found) = cache.entries.get_mut(&key) {
            found.last_used = tick;
            return Ok(found.client.clone());
        }
        // An action's own proxy replaces the server's proxies and NO_PROXY.
        let proxies = match &key.proxy {
            Some(proxy) => Proxies::only(proxy.clone()),
            None => self.settings.proxies.clone(),
        };
        let client = HttpClient::with_options(&self.settings, &key.tls, proxies)
            .map_err(|e| SendFailure::new(ErrorKind::InvalidRequest, e.to_string(), false))?;
        if cache.entries.len() >= MAX_CACHED_CLIENTS {
            let oldest = cache.entries.iter().min_by_key(|(_, c)| c.last_used).map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                // Its pooled connections close once in-flight requests using it finish.
                cache.entries.remove(&oldest);
            }
        }
        cache.entries.insert(key, Cached { client: client.clone(), last_used: tick });
        Ok(client)
    }

    /// Clients currently cached for non-default options.
    pub fn cached(&self) -> usize {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::action::{ActionInput, HttpAction};

    fn action(proxy: &str) -> HttpAction {
        HttpAction::from_input(ActionInput {
            method: "GET".into(),
            url: "http://h.test/".into(),
            proxy_url: proxy.into(),
            ..Default::default()
        })
        .unwrap()
    }

    #[tokio::test]
    async fn cache_is_bounded_and_default_actions_share_the_default_client() {
        let clients = Clients::new(&ClientSettings::default()).unwrap();
        clients.for_action(&action("")).unwrap();
        assert_eq!(clients.cached(), 0);
        for port in 0..(MAX_CACHED_CLIENTS as u16 + 5) {
            clients.for_action(&action(&format!("http://p.test:{}", 1000 + port))).unwrap();
        }
        assert_eq!(clients.cached(), MAX_CACHED_CLIENTS);
        clients.for_action(&action("http://p.test:1000")).unwrap();
        assert_eq!(clients.cached(), MAX_CACHED_CLIENTS);
    }
}
