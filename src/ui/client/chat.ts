// chat.ts: the chat panel: the run's adapter answers through `qlora serve`'s chat completions, streamed.
import {apiUrl, runPath} from "./api.js";

interface Message {
    role: "user" | "assistant";
    content: string;
}

export class ChatPanel {
    private run: string | null = null;
    private messages: Message[] = [];
    private busy = false;

    constructor(
        private readonly list: HTMLElement,
        form: HTMLFormElement,
        private readonly input: HTMLTextAreaElement,
        private readonly error: HTMLElement
    ) {
        form.addEventListener("submit", (e) => {
            e.preventDefault();
            void this.send();
        });
        input.addEventListener("keydown", (e) => {
            if (e.key === "Enter" && !e.shiftKey) {
                e.preventDefault();
                void this.send();
            }
        });
    }

    /** a new run to chat with: the conversation starts over */
    use(run: string | null): void {
        if (run === this.run) return;
        this.run = run;
        this.messages = [];
        this.list.replaceChildren();
        this.error.textContent = "";
    }

    private bubble(m: Message): HTMLElement {
        const div = document.createElement("div");
        div.className = `msg ${m.role}`;
        div.textContent = m.content;
        this.list.append(div);
        this.list.scrollTop = this.list.scrollHeight;
        return div;
    }

    private async send(): Promise<void> {
        const text = this.input.value.trim();
        if (!text || !this.run || this.busy) return;
        this.busy = true;
        this.error.textContent = "";
        this.input.value = "";
        const user: Message = {role: "user", content: text};
        this.messages.push(user);
        this.bubble(user);
        const answer: Message = {role: "assistant", content: ""};
        const div = this.bubble(answer);
        div.classList.add("pending");
        try {
            const res = await fetch(apiUrl(runPath(this.run, "/v1/chat/completions")), {
                method: "POST",
                headers: {"content-type": "application/json"},
                body: JSON.stringify({messages: this.messages, stream: true, max_tokens: 128, temperature: 0.7})
            });
            if (!res.ok || !res.body) {
                const body = (await res.json().catch(() => null)) as {error?: {message?: string}} | null;
                throw new Error(body?.error?.message ?? `${res.status} ${res.statusText}`);
            }
            const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
            let buffer = "";
            for (;;) {
                const {value, done} = await reader.read();
                if (done) break;
                buffer += value;
                const events = buffer.split("\n\n");
                buffer = events.pop() ?? "";
                for (const ev of events) {
                    const data = ev.replace(/^data: /, "");
                    if (data === "[DONE]") continue;
                    const chunk = JSON.parse(data) as {choices?: {delta?: {content?: string}}[]; error?: {message: string}};
                    if (chunk.error) throw new Error(chunk.error.message);
                    answer.content += chunk.choices?.[0]?.delta?.content ?? "";
                    div.textContent = answer.content;
                }
            }
            this.messages.push(answer);
        } catch (err) {
            this.error.textContent = (err as Error).message;
            this.messages.pop();
            div.remove();
        } finally {
            div.classList.remove("pending");
            this.busy = false;
        }
    }
}
