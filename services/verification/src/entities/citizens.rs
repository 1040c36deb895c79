//! `citizens`: the population register of this home bureau.
use chrono::NaiveDate;
use sea_orm::entity::prelude::*;

use super::{StoredCredit, StoredRegistration, StoredSex};

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "citizens")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id_number: String,
    pub name: String,
    pub sex: StoredSex,
    pub birth_date: NaiveDate,
    pub registration_province: String,
    pub address: String,
    #[sea_orm(column_type = "Blob")]
    pub face_template: Vec<u8>,
    #[sea_orm(column_type = "Blob")]
    pub fingerprint_template: Vec<u8>,
    pub credit_status: StoredCredit,
    pub registration_status: StoredRegistration,
    pub date_of_death: Option<NaiveDate>,
    /// None: never held a card (K4).
    pub current_card_serial: Option<String>,
    pub current_card_valid_from: Option<NaiveDate>,
    /// None: long-term (or no card).
    pub current_card_valid_until: Option<NaiveDate>,
    pub updated_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
