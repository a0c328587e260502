"""Studies: claims of the papers re-run as paired arms over seeds, with one command to run
them (resumable) and one to turn the records into a report with intervals and verdicts."""
