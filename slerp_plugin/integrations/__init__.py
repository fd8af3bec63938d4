"""The faces of slerp_plugin inside other tools: a mergekit merge method (:mod:`.mergekit`) and
Airflow DAG building blocks, pipeline tasks and the dashboard (:mod:`.airflow`)."""
