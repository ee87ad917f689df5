//! A tenant's archetype policy: group rules, then the classifier, then the bundle's
//! default. Manual overrides sit above all of it and are kept by the store, which never
//! asks the policy about a user with an override.
use serde_json::Value;
use std::path::{Path, PathBuf};

use super::{Bundle, Classifier, ClassifyError};
use crate::config::{GroupRule, TenantConfig};
use crate::scim::schema::ENTERPRISE_USER_SCHEMA;
use crate::store::{AssignmentSource, Decision, GroupRef, Resolver};

pub const CLASSIFIER_ACTOR: &str = "service:classifier";
pub const DEFAULT_ACTOR: &str = "service:default";

/// Classifiers by the fingerprint of the bundle they were trained from, while a tenant
/// holds them: tenants naming the same bundle share one model. Each trained its own, one
/// tenant after another, which took a daemon of 500 tenants on the demo bundle 5.5 s to
/// start, and would take minutes for a large bundle. Training is deterministic, so a
/// shared model classifies as each tenant's own would.
static TRAINED: std::sync::LazyLock<
    std::sync::Mutex<std::collections::HashMap<String, std::sync::Weak<Classifier>>>,
> = std::sync::LazyLock::new(Default::default);

/// The classifier of `bundle`, whose [`Bundle::fingerprint`] is `key`: one already
/// trained from the same content, or a new one.
fn trained(bundle: &Bundle, key: String) -> std::sync::Arc<Classifier> {
    let held = || TRAINED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(c) = held().get(&key).and_then(std::sync::Weak::upgrade) {
        return c;
    }
    // Trained outside the lock: another tenant's different bundle need not wait for it.
    let fresh = std::sync::Arc::new(Classifier::new(bundle));
    let mut map = held();
    map.retain(|_, c| c.strong_count() > 0);
    match map.get(&key).and_then(std::sync::Weak::upgrade) {
        Some(c) => c,
        None => {
            map.insert(key, std::sync::Arc::downgrade(&fresh));
            fresh
        }
    }
}

pub struct TenantPolicy {
    bundle: Bundle,
    classifier: std::sync::Arc<Classifier>,
    rules: Vec<GroupRule>,
    threshold: f64,
    fingerprint: String,
    /// The file it was loaded from and how long reading and training took, when loaded
    /// from a tenant's config.
    loaded_from: Option<(PathBuf, f64)>,
}

impl TenantPolicy {
    /// Build from a loaded bundle; group rules must name archetypes of the bundle.
    pub fn new(
        bundle: Bundle,
        rules: Vec<GroupRule>,
        threshold: Option<f64>,
    ) -> Result<TenantPolicy, ClassifyError> {
        let content = bundle.fingerprint();
        Self::trained_from(bundle, content, rules, threshold)
    }

    /// [`TenantPolicy::new`] given the bundle's fingerprint (`content`), already computed.
    fn trained_from(
        bundle: Bundle,
        content: String,
        rules: Vec<GroupRule>,
        threshold: Option<f64>,
    ) -> Result<TenantPolicy, ClassifyError> {
        check_rules(&bundle, &rules)?;
        let fingerprint = fingerprint(&content, &bundle, &rules, threshold);
        let classifier = trained(&bundle, content);
        Ok(TenantPolicy {
            threshold: threshold.unwrap_or(bundle.review_threshold),
            bundle,
            classifier,
            rules,
            fingerprint,
            loaded_from: None,
        })
    }

    /// The bundle file a tenant's config names, resolved against the config's directory.
    fn bundle_path(t: &TenantConfig, base_dir: &Path) -> Option<PathBuf> {
        t.bundle.as_ref().map(|path| {
            if path.is_absolute() {
                path.clone()
            } else {
                base_dir.join(path)
            }
        })
    }

    /// Read, without training, the bundle a tenant's config names (relative to the
    /// config's directory). None without a bundle.
    pub fn read(t: &TenantConfig, base_dir: &Path) -> Result<Option<BundleRead>, ClassifyError> {
        let Some(path) = Self::bundle_path(t, base_dir) else {
            return Ok(None);
        };
        let started = std::time::Instant::now();
        let bundle = Bundle::load(&path)?;
        let content = bundle.fingerprint();
        Ok(Some(BundleRead {
            fingerprint: fingerprint(&content, &bundle, &t.group_rules, t.review_threshold),
            content,
            bundle,
            rules: t.group_rules.clone(),
            threshold: t.review_threshold,
            path,
            started,
        }))
    }

    /// [`TenantPolicy::read`] on a blocking thread, as a file read may block (a hung
    /// network mount).
    pub async fn read_blocking(
        t: &TenantConfig,
        base_dir: &Path,
    ) -> Result<Option<BundleRead>, ClassifyError> {
        let (t, base_dir) = (t.clone(), base_dir.to_owned());
        off_runtime(move || Self::read(&t, &base_dir)).await
    }

    /// Whether [`TenantPolicy::load`] would load the bundle a tenant's config names, found
    /// without training (which cannot fail, and takes seconds for a large bundle): a
    /// reload asks this of a file a restart would load, at every reload until then.
    pub fn loads(t: &TenantConfig, base_dir: &Path) -> Result<(), ClassifyError> {
        Self::read(t, base_dir)?.map_or(Ok(()), |read| check_rules(&read.bundle, &read.rules))
    }

    /// [`TenantPolicy::loads`] on a blocking thread.
    pub async fn loads_blocking(t: &TenantConfig, base_dir: &Path) -> Result<(), ClassifyError> {
        let (t, base_dir) = (t.clone(), base_dir.to_owned());
        off_runtime(move || Self::loads(&t, &base_dir)).await
    }

    /// Load the bundle a tenant's config names (relative to the config's directory).
    pub fn load(t: &TenantConfig, base_dir: &Path) -> Result<Option<TenantPolicy>, ClassifyError> {
        Self::read(t, base_dir)?.map(BundleRead::train).transpose()
    }

    /// The bundle file this policy was loaded from, and the seconds reading and training
    /// took.
    pub fn loaded_from(&self) -> Option<(&Path, f64)> {
        self.loaded_from.as_ref().map(|(p, s)| (p.as_path(), *s))
    }

    /// [`TenantPolicy::load`] on a blocking thread: training takes seconds for a large
    /// bundle (it grows with examples times archetypes), and on an async worker it would
    /// stall requests and the watchdog's pings for as long.
    pub async fn load_blocking(
        t: &TenantConfig,
        base_dir: &Path,
    ) -> Result<Option<TenantPolicy>, ClassifyError> {
        let (t, base_dir) = (t.clone(), base_dir.to_owned());
        off_runtime(move || Self::load(&t, &base_dir)).await
    }

    pub fn bundle(&self) -> &Bundle {
        &self.bundle
    }

    pub fn classifier(&self) -> &Classifier {
        &self.classifier
    }

    pub fn review_threshold_value(&self) -> f64 {
        self.threshold
    }

    /// Identity of everything that decides assignments: a change means reclassify.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The archetype a group rule gives members of this group, if any.
    pub fn group_rule_for(
        &self,
        id: &str,
        display_name: Option<&str>,
        external_id: Option<&str>,
    ) -> Option<&str> {
        self.rules
            .iter()
            .find(|r| rule_matches(r, id, display_name, external_id))
            .map(|r| r.archetype.as_str())
    }
}

/// A tenant's bundle file as read once, not yet trained. A reload compares its
/// fingerprint with the running policy's and trains from this same read: reading the file
/// a second time to train would let a read that fails in between (a file being rewritten
/// in place) pass for a change, and retrain and reclassify for an identical bundle.
pub struct BundleRead {
    bundle: Bundle,
    content: String,
    fingerprint: String,
    rules: Vec<GroupRule>,
    threshold: Option<f64>,
    path: PathBuf,
    started: std::time::Instant,
}

impl BundleRead {
    /// What the policy trained from this read would have as [`TenantPolicy::fingerprint`].
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Train the policy; seconds to minutes for a large bundle.
    pub fn train(self) -> Result<TenantPolicy, ClassifyError> {
        let mut policy =
            TenantPolicy::trained_from(self.bundle, self.content, self.rules, self.threshold)?;
        policy.loaded_from = Some((self.path, self.started.elapsed().as_secs_f64()));
        Ok(policy)
    }

    /// [`BundleRead::train`] on a blocking thread, off the async workers.
    pub async fn train_blocking(self) -> Result<TenantPolicy, ClassifyError> {
        off_runtime(move || self.train()).await
    }
}

/// `f` on a blocking thread: reading a bundle may block (a hung network mount) and
/// training takes seconds to minutes, which on an async worker would stall requests and
/// the watchdog's pings for as long.
async fn off_runtime<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ClassifyError> + Send + 'static,
) -> Result<T, ClassifyError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ClassifyError::Interrupted(e.to_string()))?
}

/// Group rules must name archetypes of the bundle: everything but training that decides
/// whether a bundle loads for a tenant.
fn check_rules(bundle: &Bundle, rules: &[GroupRule]) -> Result<(), ClassifyError> {
    for (i, r) in rules.iter().enumerate() {
        if bundle.get(&r.archetype).is_none() {
            return Err(ClassifyError::UnknownRuleArchetype {
                index: i,
                group: r.group.clone(),
                archetype: r.archetype.clone(),
                bundle_version: bundle.version.clone(),
            });
        }
    }
    Ok(())
}

/// Everything that decides assignments: a change of it means reclassify. Rules and
/// threshold decide too, so they are part of the identity a reload compares.
/// The policy's fingerprint, from its bundle's (`content`, read once by the caller, who
/// also keys the trained model by it).
fn fingerprint(
    content: &str,
    bundle: &Bundle,
    rules: &[GroupRule],
    threshold: Option<f64>,
) -> String {
    let mut rules_part = rules
        .iter()
        .map(|r| format!("{}={}", r.group, r.archetype))
        .collect::<Vec<_>>()
        .join(",");
    // How a rule names a group decides too: tenants with rules are reclassified by the
    // rosterd that reads names in any case beyond ASCII (`config::names_group`), and only
    // they, once.
    if !rules.is_empty() {
        rules_part.insert_str(0, GROUP_NAMING);
    }
    format!(
        "{}:{}:{}:{}",
        super::REVISION,
        content,
        rules_part,
        threshold.unwrap_or(bundle.review_threshold)
    )
}

/// The revision of how a group rule's `group` names a group; part of the fingerprint of a
/// tenant with rules.
const GROUP_NAMING: &str = "names-unicode-case;";

fn rule_matches(r: &GroupRule, id: &str, name: Option<&str>, external: Option<&str>) -> bool {
    crate::config::names_group(&r.group, id, name, external)
}

fn text(v: Option<&Value>) -> Option<&str> {
    v.and_then(Value::as_str).filter(|s| !s.trim().is_empty())
}

impl Resolver for TenantPolicy {
    fn decide(&self, user: &Value, groups: &[GroupRef]) -> Decision {
        let version = self.bundle.version.clone();
        // Rules in config order: the operator's order is the precedence among groups.
        for r in &self.rules {
            if let Some(g) = groups.iter().find(|g| {
                rule_matches(
                    r,
                    &g.id,
                    g.display_name.as_deref(),
                    g.external_id.as_deref(),
                )
            }) {
                return Decision {
                    archetype_id: Some(r.archetype.clone()),
                    confidence: 1.0,
                    assigned_by: format!("group:{}", g.id),
                    source: AssignmentSource::Group,
                    bundle_version: version,
                    candidates: vec![],
                };
            }
        }
        let title = text(user.get("title")).unwrap_or("");
        let department = text(
            user.get(ENTERPRISE_USER_SCHEMA)
                .and_then(|e| e.get("department")),
        );
        let c = self.classifier.classify(title, department);
        let evidence = c.has_evidence();
        let (confidence, candidates) = (c.confidence, c.candidates);
        match c.archetype_id {
            // No title, or none with a word the bundle knows (a department alone is no
            // evidence), falls back to the default inside the classifier; that is the
            // default's decision, not the classifier's.
            Some(a) if evidence => Decision {
                archetype_id: Some(a),
                confidence,
                assigned_by: CLASSIFIER_ACTOR.into(),
                source: AssignmentSource::Classifier,
                bundle_version: version,
                candidates,
            },
            _ => Decision {
                archetype_id: self.bundle.default_archetype.clone(),
                confidence: 0.0,
                assigned_by: DEFAULT_ACTOR.into(),
                source: if self.bundle.default_archetype.is_some() {
                    AssignmentSource::Default
                } else {
                    AssignmentSource::Unassigned
                },
                bundle_version: version,
                candidates,
            },
        }
    }

    fn review_threshold(&self) -> f64 {
        self.threshold
    }

    fn uses_groups(&self) -> bool {
        !self.rules.is_empty()
    }

    fn bundle_version(&self) -> &str {
        &self.bundle.version
    }

    fn has_archetype(&self, id: &str) -> bool {
        self.bundle.get(id).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(bundle: &Path, rules: &[(&str, &str)]) -> TenantConfig {
        TenantConfig {
            id: "t".into(),
            token_env: None,
            token_hashes: vec![],
            bundle: Some(bundle.to_owned()),
            review_threshold: None,
            allow_overrides: true,
            group_rules: rules
                .iter()
                .map(|(group, archetype)| GroupRule {
                    group: (*group).into(),
                    archetype: (*archetype).into(),
                })
                .collect(),
            idp: None,
            group_roles: vec![],
        }
    }

    /// `loads_blocking` says what `load` would, and trains nothing: a reload asks it of a
    /// bundle only a restart would load, at each reload until then.
    #[tokio::test]
    async fn whether_a_bundle_loads_is_found_without_training_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("b.toml");
        // Content of its own, so that no other test's model shares its key.
        let text = format!(
            "version = \"{}\"\ndefault_archetype = \"a\"\n[[archetypes]]\nid = \"a\"\ntitle = \"A\"\nfunction_focus = []\ndefault_cowork_id = \"c\"\nexamples = [\"Accountant\"]\n[[archetypes]]\nid = \"b\"\ntitle = \"B\"\nfunction_focus = []\ndefault_cowork_id = \"c\"\nexamples = [\"Baker\"]\n",
            std::process::id()
        );
        std::fs::write(&file, &text).unwrap();
        let key = Bundle::load(&file).unwrap().fingerprint();
        let cases = [
            (tenant(&file, &[]), true),
            (tenant(&file, &[("Bakers", "b")]), true),
            (tenant(&file, &[("Bakers", "c")]), false),
            (tenant(&dir.path().join("missing.toml"), &[]), false),
        ];
        for (t, loads) in &cases {
            let said = TenantPolicy::loads_blocking(t, dir.path()).await;
            assert_eq!(said.is_ok(), *loads, "{:?}: {said:?}", t.group_rules);
        }
        // A model trained is keyed here, held or not, until another is trained.
        assert!(!TRAINED.lock().unwrap().contains_key(&key), "trained");
        for (t, loads) in &cases {
            assert_eq!(
                TenantPolicy::load(t, dir.path()).is_ok(),
                *loads,
                "{:?}",
                t.group_rules
            );
        }
        std::fs::write(&file, "not a bundle [").unwrap();
        assert!(
            TenantPolicy::loads_blocking(&tenant(&file, &[]), dir.path())
                .await
                .is_err()
        );
    }
}
