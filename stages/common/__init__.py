"""Small pieces the stages share: params and files, records, the task, tracking."""
