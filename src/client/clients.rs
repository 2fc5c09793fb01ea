//! The clients an executor sends with: the shared default client, and a small bounded cache of
//! clients built for actions that bring their own TLS options or proxy. Connections made with
//! different TLS or proxy settings never share a pool, since each setting has its own client.
use super::{
    egress::{EgressPolicy, EgressSettings},
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
    egress: Arc<EgressPolicy>,
    cache: Arc<Mutex<Cache>>,
}

impl Clients {
    /// Clients on `settings`, every one dialling only what `egress` allows.
    pub fn new(settings: &ClientSettings, egress: &EgressSettings) -> Result<Self, ClientBuildError> {
        let egress = Arc::new(EgressPolicy::new(egress.clone()));
        Ok(Self {
            default: HttpClient::new(settings, egress.clone())?,
            settings: Arc::new(settings.clone()),
            egress,
            cache: Arc::default(),
        })
    }

    /// The same clients with pools of their own (same settings and egress policy, no connection
    /// shared): a per-core runtime's, whose connections are then driven by that runtime alone.
    pub fn with_own_pools(&self) -> Result<Self, ClientBuildError> {
        Ok(Self {
            default: HttpClient::new(&self.settings, self.egress.clone())?,
            settings: self.settings.clone(),
            egress: self.egress.clone(),
            cache: Arc::default(),
        })
    }

    /// The server's own client (its trust roots, proxies and egress policy): token requests go
    /// through it.
    pub fn default_client(&self) -> HttpClient {
        self.default.clone()
    }

    /// The client for `action`: the default one unless it sets TLS options or a proxy. A client
    /// that cannot be built (options validation could not foresee) fails the action unsent.
    pub fn for_action(&self, action: &HttpAction) -> Result<HttpClient, SendFailure> {
        if action.tls().is_default() && action.proxy().is_none() {
            return Ok(self.default.clone());
        }
        let key = Key { tls: action.tls().clone(), proxy: action.proxy().cloned() };
        self.get_or_build(key, |key| {
            // An action's own proxy replaces the server's proxies and NO_PROXY.
            let proxies = match &key.proxy {
                Some(proxy) => Proxies::only(proxy.clone()),
                None => self.settings.proxies.clone(),
            };
            HttpClient::with_options(&self.settings, self.egress.clone(), &key.tls, proxies)
                .map_err(|e| SendFailure::new(ErrorKind::InvalidRequest, e.to_string(), false))
        })
    }

    /// The cached client for `key`, else one made by `build`. The lock is not held while
    /// building: a rustls config (trust roots, PEM parsing) takes milliseconds, and every
    /// action with its own options would wait behind it. Two actions may build the same key at
    /// once; the first inserted is kept, so both share one pool.
    fn get_or_build(
        &self,
        key: Key,
        build: impl FnOnce(&Key) -> Result<HttpClient, SendFailure>,
    ) -> Result<HttpClient, SendFailure> {
        if let Some(found) = self.lock().touch(&key) {
            return Ok(found);
        }
        let built = build(&key)?;
        let mut cache = self.lock();
        if let Some(won) = cache.touch(&key) {
            return Ok(won);
        }
        if cache.entries.len() >= MAX_CACHED_CLIENTS {
            let oldest = cache.entries.iter().min_by_key(|(_, c)| c.last_used).map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                // Its pooled connections close once in-flight requests using it finish.
                cache.entries.remove(&oldest);
            }
        }
        let tick = cache.next_tick();
        cache.entries.insert(key, Cached { client: built.clone(), last_used: tick });
        Ok(built)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        // A poisoned lock only means another thread panicked mid-update; the map is still usable.
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Clients currently cached for non-default options.
    pub fn cached(&self) -> usize {
        self.lock().entries.len()
    }
}

impl Cache {
    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    /// The client cached for `key`, marked as just used.
    fn touch(&mut self, key: &Key) -> Option<HttpClient> {
        let tick = self.next_tick();
        let found = self.entries.get_mut(key)?;
        found.last_used = tick;
        Some(found.client.clone())
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
        let clients = Clients::new(&ClientSettings::default(), &EgressSettings::default()).unwrap();
        clients.for_action(&action("")).unwrap();
        assert_eq!(clients.cached(), 0);
        for port in 0..(MAX_CACHED_CLIENTS as u16 + 5) {
            clients.for_action(&action(&format!("http://p.test:{}", 1000 + port))).unwrap();
        }
        assert_eq!(clients.cached(), MAX_CACHED_CLIENTS);
        clients.for_action(&action("http://p.test:1000")).unwrap();
        assert_eq!(clients.cached(), MAX_CACHED_CLIENTS);
    }

    fn key(proxy: &str) -> Key {
        let a = action(proxy);
        Key { tls: a.tls().clone(), proxy: a.proxy().cloned() }
    }

    #[tokio::test]
    async fn a_slow_build_does_not_block_lookups_and_the_first_insert_wins() {
        let clients = Clients::new(&ClientSettings::default(), &EgressSettings::default()).unwrap();
        let cached = clients.for_action(&action("http://p.test:1")).unwrap();
        let (looked_up_tx, looked_up_rx) = std::sync::mpsc::channel::<()>();
        let slow = {
            let clients = clients.clone();
            std::thread::spawn(move || {
                clients.get_or_build(key("http://p.test:2"), |_| {
                    // Still building: a lookup on another thread must get through meanwhile.
                    let waited = looked_up_rx.recv_timeout(std::time::Duration::from_secs(30));
                    assert!(waited.is_ok(), "the lookup was blocked behind the build");
                    HttpClient::new(&ClientSettings::default(), Arc::default())
                        .map_err(|e| SendFailure::new(ErrorKind::InvalidRequest, e.to_string(), false))
                })
            })
        };
        // Let the slow builder reach its build (it holds no lock there, so this cannot hang).
        std::thread::sleep(std::time::Duration::from_millis(20));
        let again = clients.for_action(&action("http://p.test:1")).unwrap();
        assert!(cached.same_as(&again), "the cached client is returned");
        looked_up_tx.send(()).unwrap();
        assert!(slow.join().unwrap().is_ok());
        assert_eq!(clients.cached(), 2);

        // Another action inserts the same key while this one builds: the first insert is kept.
        let mut winner = None;
        let raced = clients
            .get_or_build(key("http://p.test:3"), |_| {
                winner = Some(clients.for_action(&action("http://p.test:3")).unwrap());
                HttpClient::new(&ClientSettings::default(), Arc::default())
                    .map_err(|e| SendFailure::new(ErrorKind::InvalidRequest, e.to_string(), false))
            })
            .unwrap();
        let winner = winner.unwrap();
        assert!(winner.same_as(&raced), "the loser gets the cached client");
        assert_eq!(clients.cached(), 3);
    }
}
