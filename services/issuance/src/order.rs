//! The order as the service and its callers see it, and the broadcast of its changes.
use std::fmt;

use chrono::{DateTime, NaiveDate, Utc};
use sea_orm::{ActiveEnum, DeriveActiveEnum, EnumIter, sea_query::StringLen};
use tokio::sync::broadcast;
use uuid::Uuid;

/// The life of an order at the producer; stored in `orders.state` as these strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EnumIter, DeriveActiveEnum)]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::N(32))")]
pub enum OrderState {
    #[sea_orm(string_value = "in_production")]
    InProduction,
    #[sea_orm(string_value = "registered")]
    Registered,
    #[sea_orm(string_value = "dispatched")]
    Dispatched,
}

impl OrderState {
    pub fn is_final(self) -> bool {
        self == Self::Dispatched
    }
}

impl fmt::Display for OrderState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_value())
    }
}

/// An order as the service and its callers see it: the id number is masked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    pub order_id: Uuid,
    pub decision_id: String,
    pub application_id: String,
    pub station_id: String,
    pub id_number_masked: String,
    pub card_serial: String,
    pub state: OrderState,
    pub valid_from: NaiveDate,
    pub valid_until: Option<NaiveDate>,
    pub ready_at: DateTime<Utc>,
    pub attempts: i32,
    pub last_error: String,
    pub retry_stopped: bool,
    /// W3C `traceparent` of the PlaceOrder request.
    pub trace_context: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Every committed change of an order, for the watchers (WatchOrder).
#[derive(Debug, Clone)]
pub struct OrderEvents {
    sender: broadcast::Sender<Order>,
}

impl Default for OrderEvents {
    fn default() -> Self {
        Self { sender: broadcast::channel(256).0 }
    }
}

impl OrderEvents {
    pub fn subscribe(&self) -> broadcast::Receiver<Order> {
        self.sender.subscribe()
    }

    /// Announces a committed change to the watchers.
    pub fn publish(&self, order: &Order) {
        // No receiver is fine: nobody is watching.
        let _ = self.sender.send(order.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_states_are_stored_as_before() {
        let stored: Vec<String> = [OrderState::InProduction, OrderState::Registered, OrderState::Dispatched]
            .iter()
            .map(ActiveEnum::to_value)
            .collect();
        assert_eq!(stored, ["in_production", "registered", "dispatched"]);
        assert_eq!(OrderState::try_from_value(&"registered".to_owned()).ok(), Some(OrderState::Registered));
    }
}
