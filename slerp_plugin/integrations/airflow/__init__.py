"""Airflow: the pipeline's steps as plain functions (:mod:`.tasks`, no Airflow import), the DAG
building blocks (:mod:`.dag_factory`), nightly recipes (:mod:`.recipes`), the "SLERP merges"
dashboard (:mod:`.dashboard`) and the embedded demo (:mod:`.demo`)."""
