//! TEMPORARY stand-in with the classifier's API, replaced when the classifier lands.
pub mod policy;
pub use policy::TenantPolicy;
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum ClassifyError {
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Archetype {
    pub id: String,
    pub title: String,
    #[serde(default)]
    pub function_focus: Vec<String>,
    #[serde(default)]
    pub default_cowork_id: String,
    #[serde(default)]
    pub examples: Vec<String>,
    #[serde(default)]
    pub keywords: Vec<String>,
    #[serde(default)]
    pub departments: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Bundle {
    pub version: String,
    pub default_archetype: Option<String>,
    #[serde(default = "th")]
    pub review_threshold: f64,
    pub archetypes: Vec<Archetype>,
}
fn th() -> f64 {
    0.7
}
impl Bundle {
    pub fn load(path: &Path) -> Result<Bundle, ClassifyError> {
        let s = std::fs::read_to_string(path).map_err(|e| ClassifyError::Invalid(e.to_string()))?;
        toml::from_str(&s).map_err(|e| ClassifyError::Invalid(e.to_string()))
    }
    pub fn from_labeled_csv(_r: impl std::io::Read) -> Result<Bundle, ClassifyError> {
        Err(ClassifyError::Invalid("stub".into()))
    }
    pub fn to_toml_string(&self) -> Result<String, ClassifyError> {
        toml::to_string(self).map_err(|e| ClassifyError::Invalid(e.to_string()))
    }
    pub fn get(&self, id: &str) -> Option<&Archetype> {
        self.archetypes.iter().find(|a| a.id == id)
    }
    pub fn fingerprint(&self) -> String {
        format!("{:?}", self.version)
    }
}
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Candidate {
    pub archetype_id: String,
    pub confidence: f64,
}
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Classification {
    pub archetype_id: Option<String>,
    pub confidence: f64,
    pub candidates: Vec<Candidate>,
}
pub struct Classifier {
    b: Bundle,
}
impl Classifier {
    pub fn new(b: &Bundle) -> Classifier {
        Classifier { b: b.clone() }
    }
    pub fn classify(&self, title: &str, _d: Option<&str>) -> Classification {
        let t = title.to_lowercase();
        for a in &self.b.archetypes {
            if a.keywords.iter().any(|k| t.contains(&k.to_lowercase())) {
                return Classification {
                    archetype_id: Some(a.id.clone()),
                    confidence: 0.9,
                    candidates: vec![Candidate {
                        archetype_id: a.id.clone(),
                        confidence: 0.9,
                    }],
                };
            }
        }
        Classification {
            archetype_id: None,
            confidence: 0.0,
            candidates: vec![],
        }
    }
}
