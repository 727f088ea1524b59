"""OpenAI's shapes on Kafka: Batch API input lines as jobs, completion chunks and Batch
output lines as replies (docs/openai.md)."""
