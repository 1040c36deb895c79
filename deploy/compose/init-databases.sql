-- One database per bureau: each service owns its data.
CREATE DATABASE yidi_intake;
CREATE DATABASE yidi_verification_jiangxi;
CREATE DATABASE yidi_verification_sichuan;
CREATE DATABASE yidi_issuance;
CREATE DATABASE yidi_registry;
